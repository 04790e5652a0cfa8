//! The RustSec advisory database, read from a snapshot's `crates/` folder (each advisory a
//! Markdown file with TOML front matter), and the advisories that affect a crate version or the
//! components of a CycloneDX SBOM.

use std::path::Path;

use anyhow::{Context as _, Result};

/// One advisory of the database: the crate it is about and the versions that are not affected.
#[derive(Clone, Debug)]
pub struct Advisory {
    /// `RUSTSEC-YYYY-NNNN`.
    pub id: String,
    /// The crate.
    pub package: String,
    /// `unmaintained`, `unsound` or `notice` for an informational advisory; `None` for a
    /// vulnerability.
    pub informational: Option<String>,
    patched: Vec<semver::VersionReq>,
    unaffected: Vec<semver::VersionReq>,
}

impl Advisory {
    /// Whether `version` (as an SBOM writes it) is affected: a pre-release counts as the
    /// release it leads to, and a version that does not parse as affected (unknown is not safe).
    pub fn affects_version(&self, version: &str) -> bool {
        let Ok(v) = semver::Version::parse(version.trim_start_matches('v')) else {
            return true;
        };
        self.affects(&v) || self.affects(&semver::Version::new(v.major, v.minor, v.patch))
    }

    /// Whether `version` is affected: neither patched nor unaffected.
    pub fn affects(&self, version: &semver::Version) -> bool {
        !self
            .patched
            .iter()
            .chain(&self.unaffected)
            .any(|r| r.matches(version))
    }

    /// Parses an advisory file (`crates/<name>/RUSTSEC-*.md`: TOML front matter in a fenced
    /// block); `None` for a withdrawn advisory.
    fn parse(text: &str) -> Result<Option<Self>> {
        let front = text
            .strip_prefix("```toml")
            .and_then(|t| t.split_once("\n```"))
            .map(|(f, _)| f)
            .context("no TOML front matter")?;
        let mut section = String::new();
        let mut fields = std::collections::BTreeMap::new();
        let mut lines = front.lines();
        while let Some(line) = lines.next() {
            let line = without_comment(line).trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                name.clone_into(&mut section);
                continue;
            }
            let Some((key, value)) = line.split_once(" = ") else {
                continue;
            };
            let mut value = value.trim().to_owned();
            // An array may span lines.
            if value.starts_with('[') {
                while !value.trim_end().ends_with(']') {
                    let Some(more) = lines.next() else { break };
                    value.push_str(without_comment(more).trim());
                }
            }
            fields.insert(format!("{section}.{}", key.trim()), value);
        }
        if fields.contains_key("advisory.withdrawn") {
            return Ok(None);
        }
        let string = |key: &str| fields.get(key).map(|v| quoted(v).concat());
        let reqs = |key: &str| -> Result<Vec<semver::VersionReq>> {
            fields.get(key).map_or(Ok(Vec::new()), |v| {
                quoted(v)
                    .into_iter()
                    .map(|r| semver::VersionReq::parse(r).with_context(|| format!("{key}: {r}")))
                    .collect()
            })
        };
        Ok(Some(Advisory {
            id: string("advisory.id").context("no advisory.id")?,
            package: string("advisory.package").context("no advisory.package")?,
            informational: string("advisory.informational"),
            patched: reqs("versions.patched")?,
            unaffected: reqs("versions.unaffected")?,
        }))
    }
}

/// `line` without its comment (a `#` outside quotes and what follows).
fn without_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The strings quoted in `value` (`"a"` or `["a", "b"]`).
fn quoted(value: &str) -> Vec<&str> {
    value.split('"').skip(1).step_by(2).collect()
}

/// The advisory database (the snapshot's `crates/` folder), by crate.
pub struct Database {
    by_crate: std::collections::BTreeMap<String, Vec<Advisory>>,
}

impl Database {
    /// Loads every advisory under `snapshot/crates`; withdrawn ones are left out.
    pub fn load(snapshot: &Path) -> Result<Self> {
        let mut by_crate = std::collections::BTreeMap::<String, Vec<Advisory>>::new();
        let crates = snapshot.join("crates");
        for dir in
            std::fs::read_dir(&crates).with_context(|| format!("reading {}", crates.display()))?
        {
            for file in std::fs::read_dir(dir?.path())? {
                let path = file?.path();
                if path.extension().is_none_or(|e| e != "md") {
                    continue;
                }
                let text = std::fs::read_to_string(&path)?;
                if let Some(a) =
                    Advisory::parse(&text).with_context(|| format!("{}", path.display()))?
                {
                    by_crate.entry(a.package.clone()).or_default().push(a);
                }
            }
        }
        Ok(Database { by_crate })
    }

    /// The advisory `id`, if the database has it.
    pub fn advisory(&self, id: &str) -> Option<&Advisory> {
        self.by_crate.values().flatten().find(|a| a.id == id)
    }

    /// How many advisories it holds.
    pub fn len(&self) -> usize {
        self.by_crate.values().map(Vec::len).sum()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The advisories that affect `name` at `version` and fail the gate as cargo-deny's do:
    /// vulnerabilities, unsound and unmaintained crates (not notices). A version that does not
    /// parse is reported as affected by every advisory of its crate: unknown is not safe.
    pub fn affecting(&self, name: &str, version: &str) -> Vec<&Advisory> {
        let parsed = semver::Version::parse(version).ok();
        self.by_crate
            .get(name)
            .into_iter()
            .flatten()
            .filter(|a| a.informational.as_deref() != Some("notice"))
            .filter(|a| parsed.as_ref().is_none_or(|v| a.affects(v)))
            .collect()
    }
}

impl Database {
    /// (name, version, advisory) for every component of a CycloneDX SBOM (nested ones and
    /// those known by package URL too) that an advisory affects and that fails the gate (see
    /// [`Database::affecting`]); a component without a version, or with one that does not parse,
    /// is affected by every advisory of its crate.
    pub fn bom_findings(&self, bom: &serde_json::Value) -> Vec<(String, String, &Advisory)> {
        let mut out = Vec::new();
        for (name, version) in crate::sbom::components(bom) {
            for a in self.by_crate.get(&name).into_iter().flatten() {
                if a.informational.as_deref() != Some("notice") && a.affects_version(&version) {
                    out.push((name.clone(), version.clone(), a));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advisory_affects_what_is_neither_patched_nor_unaffected() {
        let text = "```toml\n[advisory]\nid = \"RUSTSEC-2021-0003\"\npackage = \"smallvec\"\n\n[affected.functions]\n# only insert_many\n\"smallvec::SmallVec::insert_many\" = [\">= 0.6.3\"] # from 0.6.3\n\n[versions]\npatched = [\n    \">= 0.6.14, < 1.0.0\", # the 0.6 line\n    \">= 1.6.1\",\n]\nunaffected = [\"< 0.6.3\"]\n```\n\n# Title\n";
        let a = Advisory::parse(text)
            .expect("parse")
            .expect("not withdrawn");
        assert_eq!(
            (a.id.as_str(), a.package.as_str()),
            ("RUSTSEC-2021-0003", "smallvec")
        );
        let v = |s: &str| semver::Version::parse(s).expect("version");
        for affected in ["0.6.3", "0.6.13", "1.0.0", "1.6.0"] {
            assert!(a.affects(&v(affected)), "{affected}");
        }
        for fine in ["0.6.2", "0.6.14", "1.6.1", "2.0.0"] {
            assert!(!a.affects(&v(fine)), "{fine}");
        }
        let withdrawn = text.replace(
            "package = \"smallvec\"\n",
            "package = \"smallvec\"\nwithdrawn = \"2021-02-01\"\n",
        );
        assert!(Advisory::parse(&withdrawn).expect("parse").is_none());
    }
}
