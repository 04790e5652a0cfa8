//! The dependency-advisory gate on a scratch crate that depends on a vulnerable version
//! (`smallvec` 1.6.0, RUSTSEC-2021-0003): refused; accepted with an exception that says why, who
//! and until when; refused again the day after the exception expires. Against the advisory
//! database snapshot the environment provides (no network).

#![allow(clippy::expect_used, missing_docs)]

use std::process::Command;

use palisade_e2e::{
    advisories::{Exception, check, prepare_db, snapshot_dir},
    run_ok,
};

#[test]
fn a_vulnerable_dependency_is_refused_until_an_exception_accepts_it_and_again_once_it_expires() {
    let snapshot = snapshot_dir();
    assert!(
        snapshot.join("SNAPSHOT").is_file(),
        "no advisory database snapshot at {} (set PALISADE_ADVISORY_DB)",
        snapshot.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let krate = dir.path().join("scratch");
    std::fs::create_dir_all(krate.join("src")).expect("mkdir");
    std::fs::write(
        krate.join("Cargo.toml"),
        "[package]\nname = \"scratch\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\nsmallvec = \"=1.6.0\"\n\n[workspace]\n",
    )
    .expect("manifest");
    std::fs::write(krate.join("src/lib.rs"), "").expect("lib");
    // The lockfile and the crate's source, fetched once (the check itself is offline).
    run_ok(
        Command::new("cargo")
            .arg("fetch")
            .arg("--manifest-path")
            .arg(krate.join("Cargo.toml")),
    )
    .expect("cargo fetch");
    let db = dir.path().join("db");
    prepare_db(&snapshot, &db).expect("advisory database");

    let refused = check(&krate, &[], "2026-12-02", &db).expect("check");
    assert!(!refused.passed, "{}", refused.report);
    assert!(
        refused.report.contains("RUSTSEC-2021-0003"),
        "{}",
        refused.report
    );

    let exception = Exception {
        id: "RUSTSEC-2021-0003".to_owned(),
        krate: "smallvec".to_owned(),
        mitigation: "SmallVec::insert_many is never called".to_owned(),
        accepted_by: "Security team <security@example.com>".to_owned(),
        expires: "2027-01-31".to_owned(),
    };
    let accepted =
        check(&krate, std::slice::from_ref(&exception), "2027-01-31", &db).expect("check");
    assert!(accepted.passed, "{}", accepted.report);

    let expired =
        check(&krate, std::slice::from_ref(&exception), "2027-02-01", &db).expect("check");
    assert!(!expired.passed, "{}", expired.report);
    assert!(
        expired.report.contains("expired on 2027-01-31"),
        "{}",
        expired.report
    );

    // An exception for another advisory accepts nothing.
    let other = Exception {
        id: "RUSTSEC-2020-0001".to_owned(),
        ..exception
    };
    let still = check(&krate, &[other], "2026-12-02", &db).expect("check");
    assert!(!still.passed, "{}", still.report);
}

/// Every advisory of the snapshot parses; a version range from it decides as the advisory says.
#[test]
fn the_whole_snapshot_parses_and_matches_versions() {
    let db = palisade_e2e::advisories::Database::load(&snapshot_dir()).expect("database");
    assert!(db.len() > 500, "{} advisories", db.len());
    let ids = |name: &str, version: &str| -> Vec<String> {
        db.affecting(name, version)
            .iter()
            .map(|a| a.id.clone())
            .collect()
    };
    assert!(ids("smallvec", "1.6.0").contains(&"RUSTSEC-2021-0003".to_owned()));
    assert!(!ids("smallvec", "1.6.1").contains(&"RUSTSEC-2021-0003".to_owned()));
    // A version that does not parse is not assumed safe.
    assert!(ids("smallvec", "not-a-version").contains(&"RUSTSEC-2021-0003".to_owned()));
    assert!(ids("palisade-operator", "0.1.0").is_empty());
}

/// An advisory whose affected-functions table carries trailing comments (RUSTSEC-2026-0009) is
/// read to its `[versions]`: the patched `time` is not reported, an affected one is.
#[test]
fn trailing_comments_do_not_hide_the_patched_versions() {
    let db = palisade_e2e::advisories::Database::load(&snapshot_dir()).expect("database");
    let has = |version: &str| {
        db.affecting("time", version)
            .iter()
            .any(|a| a.id == "RUSTSEC-2026-0009")
    };
    assert!(!has("0.3.55") && !has("0.3.47"));
    assert!(has("0.3.46") && has("0.3.6"));
    assert!(!has("0.3.5"));
}
