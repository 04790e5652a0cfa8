//! A real local control plane for Palisade's quick start and end-to-end tests, and the helpers
//! the tests use (in the style of linkerd's policy-test: `with_temp_ns`, `accepts`, `rejects`).
//!
//! Binaries come from `e2e/toolchain/build.sh` (built from the Go module proxy); third-party CRDs
//! (Istio, Gateway API, Envoy Gateway, SPIRE) from the same cache.

pub mod advisories;
pub mod bench;
pub mod chartdoc;
pub mod controlplane;
pub mod envoy;
pub mod envoygateway;
pub mod hostile;
pub mod istiod;
pub mod netns;
pub mod node;
pub mod openbao;
pub mod operator;
pub mod pki;
pub mod postgres;
pub mod registry;
pub mod release;
pub mod sbom;
pub mod shop;
pub mod spire;
pub mod webhook;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use controlplane::{ControlPlane, Options};

/// The repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Directory of third-party CRDs, filled by `e2e/toolchain/build.sh crds`.
pub fn third_party_crd_dir(bin_dir: &Path) -> PathBuf {
    bin_dir
        .parent()
        .map_or_else(|| PathBuf::from("crds"), |p| p.join("crds"))
}

/// The last `n` lines of the file at `path` (empty when it cannot be read): the part of a child
/// process's log an error message carries.
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `cmd` with stdin closed and stdout and stderr both written to a new file at `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<std::process::Child> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().display()))
}

/// Runs a command and returns its output, with a readable error if it cannot start.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot run {}", cmd.get_program().display()))
}

/// Runs a command that must succeed; the error carries its stderr.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}",
            cmd.get_program().display(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every `CustomResourceDefinition` document in the YAML files of `dir` (other kinds skipped),
/// as one multi-document YAML string.
pub fn crd_documents(dir: &Path) -> Result<(String, usize)> {
    let mut files: Vec<PathBuf> = walk_yaml(dir)?;
    files.sort();
    let mut out = String::new();
    let mut n = 0;
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .with_context(|| format!("parsing {}", f.display()))?;
            if value.get("kind").and_then(|k| k.as_str()) == Some("CustomResourceDefinition") {
                out.push_str("---\n");
                out.push_str(&serde_yaml::to_string(&value)?);
                n += 1;
            }
        }
    }
    Ok((out, n))
}

fn walk_yaml(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk_yaml(&path)?);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(out)
}

impl ControlPlane {
    /// Applies (server-side) Palisade's CRDs and the third-party CRDs, and waits until all are
    /// Established. Returns how many CRDs were applied.
    pub fn install_crds(&self, bin_dir: &Path) -> Result<usize> {
        let third = third_party_crd_dir(bin_dir);
        if !third.is_dir() {
            bail!(
                "third-party CRDs not found in {}: run e2e/toolchain/build.sh crds",
                third.display()
            );
        }
        let mut total = 0;
        for dir in [repo_root().join("crds"), third] {
            let (docs, n) = crd_documents(&dir)?;
            let file = self.work_dir.join(format!("crds-{total}.yaml"));
            std::fs::write(&file, docs)?;
            run_ok(
                self.kubectl()
                    .args([
                        "apply",
                        "--server-side",
                        "--force-conflicts",
                        "--field-manager=palisade-e2e",
                        "-f",
                    ])
                    .arg(&file),
            )
            .with_context(|| format!("applying the CRDs from {}", dir.display()))?;
            total += n;
        }
        run_ok(self.kubectl().args([
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]))?;
        Ok(total)
    }

    /// Creates a namespace with a unique name, runs `f` in it, and deletes it afterwards (also
    /// when `f` fails).
    pub fn with_temp_ns<T>(&self, prefix: &str, f: impl FnOnce(&str) -> Result<T>) -> Result<T> {
        let ns = format!("{prefix}-{}", unique_suffix());
        run_ok(self.kubectl().args(["create", "namespace", &ns]))?;
        let result = f(&ns);
        let _ = run(self
            .kubectl()
            .args(["delete", "namespace", &ns, "--wait=false"]));
        result
    }

    /// `kubectl apply -f <file>` as a user would run it; returns the raw output.
    pub fn apply_file(&self, file: &Path, namespace: Option<&str>) -> Result<Output> {
        let mut cmd = self.kubectl();
        cmd.arg("apply").arg("-f").arg(file);
        if let Some(ns) = namespace {
            cmd.args(["-n", ns]);
        }
        run(&mut cmd)
    }

    /// Polls `probe` every 200 ms until it returns `Some`, or fails after `timeout` with `what`.
    pub fn eventually<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Result<T> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(v) = probe() {
                return Ok(v);
            }
            if std::time::Instant::now() > deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Asserts that a `kubectl` invocation succeeded.
pub fn accepts(out: &Output, what: &str) -> Result<()> {
    if out.status.success() {
        Ok(())
    } else {
        bail!(
            "{what}: expected the API server to accept it, but kubectl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Asserts that a `kubectl` invocation failed with every one of `needles` in its stderr.
pub fn rejects(out: &Output, what: &str, needles: &[&str]) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        bail!("{what}: expected a rejection, but kubectl succeeded");
    }
    for n in needles {
        if !stderr.contains(n) {
            bail!(
                "{what}: rejected, but stderr lacks {n:?}: {}",
                stderr.trim()
            );
        }
    }
    Ok(())
}

/// A suffix no other call in this process returns (for names of temporary objects).
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{:x}{:x}",
        nanos % 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
