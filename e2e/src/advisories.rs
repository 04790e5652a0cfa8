//! The dependency-advisory gate: `cargo deny check advisories` against the RustSec advisory
//! database snapshot that comes with the project's environment (no network), with exceptions
//! that must say why, who accepted them, and until when.
//!
//! An exception (in `security/advisory-exceptions.yaml`) names one advisory and the crate it is
//! about, the mitigation that makes it acceptable for now, who accepted it, and an expiry date.
//! An exception missing any of those, or past its date, fails the gate by itself, so an accepted
//! risk comes back for a decision instead of lasting forever.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::run;

/// The folder cargo-deny looks for under its `db-path` for the default advisory database URL
/// (`https://github.com/rustsec/advisory-db`).
const DB_FOLDER: &str = "advisory-db-3157b0e258782691";

/// The exceptions file, relative to the repository root.
pub const EXCEPTIONS: &str = "security/advisory-exceptions.yaml";

/// One accepted advisory.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exception {
    /// The advisory, e.g. `RUSTSEC-2021-0003`.
    pub id: String,
    /// The crate it is about.
    #[serde(rename = "crate")]
    pub krate: String,
    /// Why the vulnerable code cannot be reached or exploited here, until the fix.
    pub mitigation: String,
    /// Who accepted the risk.
    pub accepted_by: String,
    /// The last day the exception holds (`YYYY-MM-DD`).
    pub expires: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExceptionsFile {
    #[serde(default)]
    exceptions: Vec<Exception>,
}

/// Reads an exceptions file (`exceptions:` list); a missing file has none.
pub fn read_exceptions(path: &Path) -> Result<Vec<Exception>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: ExceptionsFile =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(file.exceptions)
}

/// What is wrong with `exceptions` on `today` (`YYYY-MM-DD`), one line each: empty fields, a
/// malformed id or date, an exception past its expiry, or the same advisory twice.
pub fn problems(exceptions: &[Exception], today: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for e in exceptions {
        let id = &e.id;
        for (field, value) in [
            ("crate", &e.krate),
            ("mitigation", &e.mitigation),
            ("acceptedBy", &e.accepted_by),
        ] {
            if value.trim().is_empty() {
                out.push(format!("exception {id}: {field} is empty"));
            }
        }
        if !is_advisory_id(id) {
            out.push(format!(
                "exception {id:?}: not an advisory id (RUSTSEC-YYYY-NNNN)"
            ));
        }
        if !seen.insert(id.as_str()) {
            out.push(format!("exception {id}: listed twice"));
        }
        if !is_date(&e.expires) {
            out.push(format!(
                "exception {id}: expires {:?} is not a date (YYYY-MM-DD)",
                e.expires
            ));
        } else if e.expires.as_str() < today {
            out.push(format!(
                "exception {id} ({}) expired on {} (accepted by {}): upgrade the crate, or renew the exception with a new decision",
                e.krate, e.expires, e.accepted_by
            ));
        }
    }
    out
}

fn is_advisory_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('-').collect();
    matches!(parts.as_slice(), [prefix, year, number]
        if *prefix == "RUSTSEC"
            && year.len() == 4
            && number.len() == 4
            && year.chars().chain(number.chars()).all(|c| c.is_ascii_digit()))
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
        && (1..=12).contains(&s[5..7].parse::<u32>().unwrap_or(0))
        && (1..=31).contains(&s[8..10].parse::<u32>().unwrap_or(0))
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!("{y:04}-{m:02}-{d:02}")
}

/// The proleptic Gregorian date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The snapshot of the advisory database the environment provides: `$PALISADE_ADVISORY_DB`, or
/// `../shared/advisory-db` beside the repository.
pub fn snapshot_dir() -> PathBuf {
    std::env::var_os("PALISADE_ADVISORY_DB").map_or_else(
        || crate::repo_root().join("../shared/advisory-db"),
        PathBuf::from,
    )
}

/// Makes `db_root` hold the snapshot as cargo-deny expects its database: a git checkout in
/// [`DB_FOLDER`] (one commit of the exported files). Redone when the snapshot changed.
pub fn prepare_db(snapshot: &Path, db_root: &Path) -> Result<()> {
    let stamp = std::fs::read_to_string(snapshot.join("SNAPSHOT")).with_context(|| {
        format!(
            "no advisory database snapshot at {} (its SNAPSHOT file names the commit)",
            snapshot.display()
        )
    })?;
    let db = db_root.join(DB_FOLDER);
    if std::fs::read_to_string(db.join("SNAPSHOT")).is_ok_and(|s| s == stamp)
        && db.join(".git").is_dir()
    {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&db);
    std::fs::create_dir_all(db_root)?;
    crate::run_ok(Command::new("cp").arg("-r").arg(snapshot).arg(&db))?;
    let git = |args: &[&str]| {
        crate::run_ok(
            Command::new("git")
                .arg("-C")
                .arg(&db)
                .args([
                    "-c",
                    "user.name=palisade",
                    "-c",
                    "user.email=palisade@localhost",
                ])
                .args(args),
        )
    };
    git(&["init", "-q"])?;
    git(&["add", "-A"])?;
    git(&["commit", "-q", "-m", stamp.trim()])?;
    Ok(())
}

/// The outcome of one check.
#[derive(Debug)]
pub struct Outcome {
    /// Whether the gate passes: no exception problem, and cargo-deny found nothing unaccepted.
    pub passed: bool,
    /// The exception problems and cargo-deny's report.
    pub report: String,
}

/// Checks the workspace (or crate) at `manifest_dir` against the database in `db_root` with
/// `exceptions` as of `today`. Exception problems fail the gate whatever cargo-deny finds.
pub fn check(
    manifest_dir: &Path,
    exceptions: &[Exception],
    today: &str,
    db_root: &Path,
) -> Result<Outcome> {
    let mut report = problems(exceptions, today).join("\n");
    let config = db_root.join(format!("deny-advisories-{}.toml", std::process::id()));
    std::fs::write(&config, deny_config(db_root, exceptions))?;
    let out = run(Command::new("cargo")
        .args(["deny", "--offline", "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--config")
        .arg(&config)
        .args(["check", "advisories"]));
    let _ = std::fs::remove_file(&config);
    let out = out.context("running cargo deny (install it with cargo install cargo-deny)")?;
    // Findings go to stderr, the summary line ("advisories ok") to stdout.
    for text in [&out.stderr, &out.stdout] {
        let text = String::from_utf8_lossy(text);
        if !text.trim().is_empty() {
            if !report.is_empty() {
                report.push('\n');
            }
            report.push_str(text.trim());
        }
    }
    Ok(Outcome {
        passed: out.status.success() && problems(exceptions, today).is_empty(),
        report,
    })
}

/// cargo-deny's configuration: the local database, and each exception as an ignored advisory
/// whose reason carries its mitigation, owner and expiry.
fn deny_config(db_root: &Path, exceptions: &[Exception]) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut out = format!(
        "[graph]\ntargets = [\"x86_64-unknown-linux-gnu\", \"aarch64-unknown-linux-gnu\"]\n\n[advisories]\ndb-path = {}\n",
        quote(&db_root.display().to_string())
    );
    out.push_str("ignore = [\n");
    for e in exceptions {
        let reason = format!(
            "{} (accepted by {} until {})",
            e.mitigation, e.accepted_by, e.expires
        );
        let _ = writeln!(
            out,
            "  {{ id = {}, reason = {} }},",
            quote(&e.id),
            quote(&reason)
        );
    }
    out.push_str("]\n");
    out
}

/// Fails with the report unless the gate passes.
pub fn gate(manifest_dir: &Path, exceptions_file: &Path, today: &str) -> Result<String> {
    let exceptions = read_exceptions(exceptions_file)?;
    let db_root = crate::repo_root().join("target/advisory-dbs");
    prepare_db(&snapshot_dir(), &db_root)?;
    let outcome = check(manifest_dir, &exceptions, today, &db_root)?;
    if !outcome.passed {
        bail!("dependency advisories:\n{}", outcome.report);
    }
    Ok(outcome.report)
}

pub use palisade_cli::advisories::{Advisory, Database};

/// The findings for a CycloneDX SBOM's library components that no exception in `accepted`
/// covers: `name version: ID (kind)`, one per line.
pub fn sbom_findings(
    db: &Database,
    bom: &serde_json::Value,
    accepted: &[Exception],
) -> Vec<String> {
    let mut out = Vec::new();
    for (name, version, a) in db.bom_findings(bom) {
        if accepted.iter().any(|e| e.id == a.id && e.krate == name) {
            continue;
        }
        out.push(format!(
            "{name} {version}: {} ({})",
            a.id,
            a.informational.as_deref().unwrap_or("vulnerability")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exception(id: &str, expires: &str) -> Exception {
        Exception {
            id: id.to_owned(),
            krate: "smallvec".to_owned(),
            mitigation: "insert_many is never called".to_owned(),
            accepted_by: "Security team <security@example.com>".to_owned(),
            expires: expires.to_owned(),
        }
    }

    #[test]
    fn an_exception_holds_until_its_last_day_and_not_after() {
        let e = [exception("RUSTSEC-2021-0003", "2026-12-02")];
        assert!(problems(&e, "2026-12-02").is_empty());
        let p = problems(&e, "2026-12-03");
        assert!(
            p.len() == 1 && p[0].contains("expired on 2026-12-02"),
            "{p:?}"
        );
    }

    #[test]
    fn an_exception_without_its_fields_is_refused() {
        let mut e = exception("RUSTSEC-2021-0003", "2027-01-01");
        e.mitigation = " ".to_owned();
        e.accepted_by = String::new();
        let p = problems(&[e], "2026-12-02");
        assert!(p.iter().any(|l| l.contains("mitigation is empty")), "{p:?}");
        assert!(p.iter().any(|l| l.contains("acceptedBy is empty")), "{p:?}");
        for (id, expires) in [
            ("RUSTSEC-21-3", "2027-01-01"),
            ("RUSTSEC-2021-0003", "someday"),
            ("RUSTSEC-2021-0003", "2027-13-01"),
        ] {
            assert!(
                !problems(&[exception(id, expires)], "2026-12-02").is_empty(),
                "{id} {expires}"
            );
        }
        let twice = [
            exception("RUSTSEC-2021-0003", "2027-01-01"),
            exception("RUSTSEC-2021-0003", "2027-01-01"),
        ];
        assert!(problems(&twice, "2026-12-02")[0].contains("listed twice"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let yaml = "exceptions:\n  - {id: RUSTSEC-2021-0003, crate: smallvec, mitigation: m, acceptedBy: a, expires: 2027-01-01, expiry: never}\n";
        assert!(serde_yaml::from_str::<ExceptionsFile>(yaml).is_err());
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_789), (2026, 12, 2));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
