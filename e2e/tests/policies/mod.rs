//! Differential test: the secrets-in-env policy gives the same findings in the webhook's
//! in-process engine (regorus) as in the real OPA (`opa eval`), on a corpus of pods.

use std::{io::Write, process::Stdio};

use anyhow::{Context, Result, bail};
use palisade_e2e::repo_root;
use palisade_webhook::{
    secrets::{DENY_RULE, Finding, SecretsPolicy},
    workload::pod_of,
};
use serde_json::{Value, json};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[(
    "policies::regorus_and_opa_agree_on_secrets",
    regorus_and_opa_agree_on_secrets,
)];

fn corpus() -> Vec<Value> {
    let values = [
        "info",
        "8080",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE",
        "-----BEGIN PUBLIC KEY-----",
        "AKIAIOSFODNN7EXAMPLE",
        "AKIA-nope",
        "ghp_0123456789abcdefghijABCDEFGHIJ0123456789",
        "ghp_short",
        "glpat-abcdefghij0123456789",
        "xoxb-1234567890-abcdef",
        "sk_live_0123456789abcdefABCD",
        "sk_test_0123456789abcdefABCD",
        "AIzaSyA0123456789abcdefghijklmnopqrstuv",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl",
        "eyJ.not.jwt",
        "",
    ];
    let mut pods = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let field = ["containers", "initContainers", "ephemeralContainers"][i % 3];
        let mut spec = json!({"containers": [{"name": "app", "image": "r/a:1"}]});
        spec[field] = json!([{"name": format!("c{i}"), "image": "r/a:1", "env": [{"name": "V", "value": v}]}]);
        pods.push(spec);
    }
    pods.push(json!({"containers": [{"name": "a", "env": [
        {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        {"name": "C", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
        {"name": "F", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "envFrom": [{"secretRef": {"name": "all"}}, {"configMapRef": {"name": "cfg"}}]}]}));
    pods.push(json!({"containers": [{"name": "a", "env": [
        {"name": "A", "value": "AKIAIOSFODNN7EXAMPLE"}, {"name": "B", "value": "xoxb-1234567890-abcdef"}]}]}));
    pods
}

fn opa_eval(opa: &std::path::Path, input: &Value) -> Result<Vec<Finding>> {
    let mut child = std::process::Command::new(opa)
        .args(["eval", "--format", "json", "--stdin-input", "-d"])
        .arg(repo_root().join("policies/admission/secrets.rego"))
        .arg(DENY_RULE)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running opa")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("opa eval failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let mut findings: Vec<Finding> =
        serde_json::from_value(v["result"][0]["expressions"][0]["value"].clone())?;
    findings.sort();
    Ok(findings)
}

fn regorus_and_opa_agree_on_secrets(env: &Env) -> Result<()> {
    let opa = env.opts.bin_dir.join("opa");
    if !opa.exists() {
        bail!(
            "opa not found at {}: run e2e/toolchain/build.sh opa",
            opa.display()
        );
    }
    let policy = SecretsPolicy::new()?;
    let mut total = 0;
    for (i, spec) in corpus().into_iter().enumerate() {
        let pod = pod_of("Pod", &json!({"spec": spec}))?.context("a pod")?;
        // What admission runs (the screen on the pod, then regorus) against OPA on the input.
        let ours = policy.evaluate_pod(&pod)?;
        let theirs = opa_eval(&opa, &SecretsPolicy::input(&pod))?;
        if ours != theirs {
            bail!("pod {i}: regorus found {ours:?}, opa found {theirs:?}");
        }
        total += ours.len();
    }
    if total < 12 {
        bail!("the corpus should produce findings in both engines, got {total}");
    }
    eprintln!("  {total} findings identical in regorus and opa");
    Ok(())
}
