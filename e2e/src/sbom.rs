//! A CycloneDX 1.5 SBOM of one of Palisade's binaries, from `cargo metadata`: the package and
//! every crate it links (normal dependencies, resolved for the target platform; build scripts,
//! proc macros' own dependencies and dev-dependencies are not in the binary and are left out),
//! each with its version, licence expression, package URL and, for crates.io crates, the
//! SHA-256 recorded in Cargo.lock — and the files of the image's base layer, each with its
//! SHA-256 and, where the system's package manager knows it, the package that provided it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::run_ok;

/// Target the release binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The workspace's resolved dependency graph (`cargo metadata`) and Cargo.lock checksums, read
/// once for the SBOMs of all its binaries.
pub struct Workspace {
    meta: Value,
    checksums: BTreeMap<(String, String), String>,
}

impl Workspace {
    /// Reads the workspace at `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let text = run_ok(
            Command::new("cargo")
                .args([
                    "metadata",
                    "--format-version",
                    "1",
                    "--locked",
                    "--filter-platform",
                    TARGET,
                ])
                .current_dir(root),
        )?;
        let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
        Ok(Workspace {
            meta: serde_json::from_str(&text)?,
            checksums: checksums(&lock),
        })
    }

    /// The SBOM of workspace package `package`.
    pub fn cyclonedx(&self, package: &str) -> Result<Value> {
        from_metadata(&self.meta, &self.checksums, package)
    }
}

/// A file an image ships besides the binary (its base layer).
#[derive(Clone, Debug)]
pub struct ImageFile {
    /// Absolute path inside the image.
    pub path: String,
    /// SHA-256 of its content, lower-case hex.
    pub sha256: String,
    /// Package URL of the distribution package it was copied from, when known.
    pub purl: Option<String>,
}

impl ImageFile {
    /// `content` at `path` in the image, made from the installed distribution package `package`
    /// when there is one.
    pub fn new(path: &str, content: &[u8], package: Option<&str>) -> Self {
        ImageFile {
            path: path.to_owned(),
            sha256: sha256_hex(content),
            purl: package.and_then(debian_purl),
        }
    }
}

/// SHA-256 of `data`, lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use std::fmt::Write as _;
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// `pkg:deb/<distribution>/<package>@<version>` of installed package `package`.
fn debian_purl(package: &str) -> Option<String> {
    let version = run_ok(
        Command::new("dpkg-query")
            .args(["-W", "-f", "${Version}"])
            .arg(package),
    )
    .ok()?;
    let os = std::fs::read_to_string("/etc/os-release").ok()?;
    let distro = os
        .lines()
        .find_map(|l| l.strip_prefix("ID="))?
        .trim_matches('"')
        .to_owned();
    Some(format!("pkg:deb/{distro}/{package}@{}", version.trim()))
}

/// Adds `files` to `bom` as `file` components.
pub fn add_files(bom: &mut Value, files: &[ImageFile]) {
    let Some(components) = bom["components"].as_array_mut() else {
        return;
    };
    for f in files {
        let mut c = json!({
            "type": "file",
            "bom-ref": format!("file:{}", f.path),
            "name": f.path,
            "hashes": [{"alg": "SHA-256", "content": f.sha256}],
        });
        if let Some(purl) = &f.purl {
            c["purl"] = json!(purl);
        }
        components.push(c);
    }
}

/// Cargo.lock checksums by (name, version).
fn checksums(lock: &str) -> BTreeMap<(String, String), String> {
    let mut out = BTreeMap::new();
    let (mut name, mut version) = (String::new(), String::new());
    for line in lock.lines() {
        let value = |l: &str| l.split('"').nth(1).unwrap_or_default().to_owned();
        if line.starts_with("name = ") {
            name = value(line);
        } else if line.starts_with("version = ") {
            version = value(line);
        } else if line.starts_with("checksum = ") {
            out.insert((name.clone(), version.clone()), value(line));
        }
    }
    out
}

fn from_metadata(
    meta: &Value,
    checksums: &BTreeMap<(String, String), String>,
    package: &str,
) -> Result<Value> {
    let packages: BTreeMap<&str, &Value> = meta["packages"]
        .as_array()
        .context("metadata without packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let nodes: BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .context("metadata without a resolve graph")?
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let Some(root) = packages
        .values()
        .find(|p| p["name"] == package && p["source"].is_null())
    else {
        bail!("no workspace package {package}");
    };
    let root_id = root["id"].as_str().unwrap_or_default();
    // Breadth-first over normal (linked) dependencies.
    let mut seen: BTreeSet<&str> = BTreeSet::from([root_id]);
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut queue = VecDeque::from([root_id]);
    while let Some(id) = queue.pop_front() {
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let linked = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            let Some(pkg) = dep["pkg"].as_str() else {
                continue;
            };
            if !linked {
                continue;
            }
            edges.entry(id).or_default().insert(pkg);
            if seen.insert(pkg) {
                queue.push_back(pkg);
            }
        }
    }
    let bom_ref = |id: &str| -> String {
        let p = packages.get(id);
        let name = p.and_then(|p| p["name"].as_str()).unwrap_or(id);
        let version = p.and_then(|p| p["version"].as_str()).unwrap_or_default();
        format!("pkg:cargo/{name}@{version}")
    };
    let component = |id: &str, kind: &str| -> Value {
        let p = packages.get(id).copied().unwrap_or(&Value::Null);
        let name = p["name"].as_str().unwrap_or_default();
        let version = p["version"].as_str().unwrap_or_default();
        let mut c = json!({
            "type": kind,
            "bom-ref": bom_ref(id),
            "name": name,
            "version": version,
            "purl": bom_ref(id),
        });
        if let Some(l) = p["license"].as_str() {
            c["licenses"] = json!([{"expression": l}]);
        }
        if let Some(sum) = checksums.get(&(name.to_owned(), version.to_owned())) {
            c["hashes"] = json!([{"alg": "SHA-256", "content": sum}]);
        }
        c
    };
    let components: Vec<Value> = seen
        .iter()
        .filter(|id| **id != root_id)
        .map(|id| component(id, "library"))
        .collect();
    let dependencies: Vec<Value> = seen
        .iter()
        .map(|id| {
            let on: Vec<String> = edges
                .get(id)
                .into_iter()
                .flatten()
                .map(|d| bom_ref(d))
                .collect();
            json!({"ref": bom_ref(id), "dependsOn": on})
        })
        .collect();
    Ok(json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "component": component(root_id, "application"),
            "tools": {"components": [{"type": "application", "name": "palisade-e2e sbom"}]},
        },
        "components": components,
        "dependencies": dependencies,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_linked_dependencies_are_listed() {
        let meta = json!({
            "packages": [
                {"id": "app", "name": "app", "version": "1.0.0", "license": "Apache-2.0", "source": null},
                {"id": "lib", "name": "lib", "version": "0.2.0", "license": "MIT", "source": "registry"},
                {"id": "deep", "name": "deep", "version": "3.0.0", "license": "MIT OR Apache-2.0", "source": "registry"},
                {"id": "build-only", "name": "cc", "version": "1.0.0", "source": "registry"},
                {"id": "test-only", "name": "insta", "version": "1.0.0", "source": "registry"},
            ],
            "resolve": {"nodes": [
                {"id": "app", "deps": [
                    {"pkg": "lib", "dep_kinds": [{"kind": null}]},
                    {"pkg": "build-only", "dep_kinds": [{"kind": "build"}]},
                    {"pkg": "test-only", "dep_kinds": [{"kind": "dev"}]},
                ]},
                {"id": "lib", "deps": [{"pkg": "deep", "dep_kinds": [{"kind": null}]}]},
                {"id": "deep", "deps": []},
            ]},
        });
        let sums = BTreeMap::from([(("lib".to_owned(), "0.2.0".to_owned()), "ab".to_owned())]);
        let bom = from_metadata(&meta, &sums, "app").unwrap();
        let names: Vec<&str> = bom["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["deep", "lib"]);
        assert_eq!(bom["metadata"]["component"]["purl"], "pkg:cargo/app@1.0.0");
        assert_eq!(bom["components"][1]["hashes"][0]["content"], "ab");
        assert_eq!(
            bom["components"][0]["licenses"][0]["expression"],
            "MIT OR Apache-2.0"
        );
        assert!(from_metadata(&meta, &sums, "nope").is_err());
    }

    #[test]
    fn lock_checksums_are_read() {
        let lock = "[[package]]\nname = \"ring\"\nversion = \"0.17.14\"\nsource = \"registry+x\"\nchecksum = \"abc\"\n";
        assert_eq!(
            checksums(lock).get(&("ring".into(), "0.17.14".into())),
            Some(&"abc".to_owned())
        );
    }

    #[test]
    fn image_files_are_file_components_with_their_digest() {
        let mut bom = json!({"components": [{"type": "library", "name": "ring"}]});
        add_files(&mut bom, &[ImageFile::new("/etc/group", b"abc", None)]);
        let file = &bom["components"][1];
        assert_eq!(file["type"], "file");
        assert_eq!(file["name"], "/etc/group");
        // FIPS 180-2's "abc" test vector.
        assert_eq!(
            file["hashes"][0]["content"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(file.get("purl").is_none());
    }
}
