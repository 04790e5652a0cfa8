//! Reading manifests: YAML files (several documents each, `List` kinds unpacked) and directories
//! of them, in a stable order.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize as _;
use serde_json::Value;

/// One object read, with where it came from (for messages).
#[derive(Clone, Debug)]
pub struct Object {
    /// The file.
    pub file: PathBuf,
    /// The object.
    pub value: Value,
}

impl Object {
    /// `apiVersion` group (empty for the core group).
    pub fn group(&self) -> &str {
        self.value["apiVersion"]
            .as_str()
            .and_then(|v| v.rsplit_once('/').map(|(g, _)| g))
            .unwrap_or("")
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    /// `metadata.namespace`, or `default_ns` (as `kubectl apply -n` would place it).
    pub fn namespace<'a>(&'a self, default_ns: &'a str) -> &'a str {
        self.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_ns)
    }
}

/// Every object in `paths` (files, or directories read recursively for `*.yaml`, `*.yml` and
/// `*.json`), files in name order. A document that is not a Kubernetes object is an error.
pub fn load(paths: &[PathBuf]) -> Result<Vec<Object>> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(doc)
                .with_context(|| format!("{}: document {}", file.display(), i + 1))?;
            if value.is_null() {
                continue;
            }
            push(&file, value, i + 1, &mut out)?;
        }
    }
    Ok(out)
}

fn push(file: &Path, value: Value, doc: usize, out: &mut Vec<Object>) -> Result<()> {
    if value["kind"].as_str().is_some_and(|k| k.ends_with("List")) && value["items"].is_array() {
        for item in value["items"].as_array().into_iter().flatten() {
            push(file, item.clone(), doc, out)?;
        }
        return Ok(());
    }
    if !value["apiVersion"].is_string() || !value["kind"].is_string() {
        bail!(
            "{}: document {doc} is not a Kubernetes object (no apiVersion or kind)",
            file.display()
        );
    }
    out.push(Object {
        file: file.to_path_buf(),
        value,
    });
    Ok(())
}

fn collect(path: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if meta.is_file() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}", path.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect(&entry, files)?;
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            files.push(entry);
        }
    }
    Ok(())
}
