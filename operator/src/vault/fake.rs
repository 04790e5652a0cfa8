//! An in-memory Vault for unit tests: paths hold JSON objects, LIST lists the next segment,
//! the lease and token endpoints the operator uses behave as Vault's do, every call is logged,
//! and chosen calls can be made to fail.

use std::{collections::BTreeMap, sync::Mutex};

use serde_json::{Value, json};

use super::{VaultApi, VaultError};

/// The fake. Tokens live under `token/<accessor>` as `{meta: {role}, path}`, leases under
/// `lease/<lease path>`.
#[derive(Default)]
pub struct FakeVault {
    objects: Mutex<BTreeMap<String, Value>>,
    calls: Mutex<Vec<String>>,
    failing: Mutex<Vec<String>>,
}

impl FakeVault {
    /// Puts `value` at `path` without logging a call.
    pub fn put(&self, path: &str, value: Value) {
        if let Ok(mut o) = self.objects.lock() {
            o.insert(path.to_owned(), value);
        }
    }

    /// What `path` holds.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().ok()?.get(path).cloned()
    }

    /// Every path held.
    pub fn paths(&self) -> Vec<String> {
        self.objects
            .lock()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The calls made so far, as `METHOD path`, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        self.calls
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }

    /// Makes every call starting with `call` (`METHOD path`) fail with a 503.
    pub fn fail(&self, call: &str) {
        if let Ok(mut f) = self.failing.lock() {
            f.push(call.to_owned());
        }
    }

    fn enter(&self, method: &str, path: &str) -> Result<(), VaultError> {
        let call = format!("{method} {path}");
        let fails = self
            .failing
            .lock()
            .is_ok_and(|f| f.iter().any(|p| call.starts_with(p.as_str())));
        if let Ok(mut c) = self.calls.lock() {
            c.push(call.clone());
        }
        if fails {
            return Err(VaultError::Unavailable(format!("{call}: 503 (injected)")));
        }
        Ok(())
    }

    fn remove_prefix(&self, prefix: &str) {
        if let Ok(mut o) = self.objects.lock() {
            o.retain(|k, _| !k.starts_with(prefix));
        }
    }
}

impl VaultApi for FakeVault {
    async fn read(&self, path: &str) -> Result<Option<Value>, VaultError> {
        self.enter("GET", path)?;
        Ok(self.get(path))
    }

    async fn list(&self, path: &str) -> Result<Vec<String>, VaultError> {
        self.enter("LIST", path)?;
        let prefix = if path == "auth/token/accessors" {
            "token/".to_owned()
        } else {
            format!("{path}/")
        };
        let mut keys: Vec<String> = self
            .paths()
            .iter()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_owned)
            .collect();
        keys.dedup();
        Ok(keys)
    }

    async fn write(&self, path: &str, body: Value) -> Result<Option<Value>, VaultError> {
        self.enter("PUT", path)?;
        let accessor = || body["accessor"].as_str().unwrap_or_default().to_owned();
        if let Some(prefix) = path.strip_prefix("sys/leases/revoke-prefix/") {
            let prefix = prefix.split('?').next().unwrap_or_default();
            self.remove_prefix(&format!("lease/{prefix}/"));
            return Ok(None);
        }
        match path {
            // A `null` token stands for one that expired or vanished after it was listed.
            "auth/token/lookup-accessor" => match self.get(&format!("token/{}", accessor())) {
                Some(Value::Null) => Err(VaultError::Api(
                    "auth/token/lookup-accessor: 400 invalid accessor".into(),
                )),
                other => Ok(other),
            },
            "auth/token/revoke-accessor" => {
                self.remove_prefix(&format!("token/{}", accessor()));
                Ok(None)
            }
            _ => {
                let mut stored = body;
                if let Some(name) = path.strip_prefix("sys/policies/acl/") {
                    stored["name"] = json!(name);
                }
                self.put(path, stored);
                Ok(None)
            }
        }
    }

    async fn delete(&self, path: &str) -> Result<(), VaultError> {
        self.enter("DELETE", path)?;
        if let Ok(mut o) = self.objects.lock() {
            o.remove(path);
        }
        Ok(())
    }
}
