//! SecretBinding benchmark against a real OpenBao (and PostgreSQL behind its database engine).
//!
//! N SecretBindings (default 500; `PALISADE_BENCH_N`), each with a KV grant and a database
//! role, are created; the release operator is started and timed until every binding is `Ready`,
//! and its Vault request and write counters are divided by N. Then the operator is restarted and,
//! once it has reconciled every binding again, its Vault writes are read: a no-op resync
//! (goal 0) costs only reads.
//!
//! Run: `cargo build --release -p palisade-operator && cargo bench -p palisade-e2e --bench vault`

#![allow(clippy::expect_used, missing_docs)]

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use palisade_e2e::{
    ControlPlane, Options,
    openbao::{EXAMPLE_TENANCY, OpenBao},
    operator::OperatorProcess,
    postgres::Postgres,
    run_ok,
};

const NS: &str = "bench";

fn bindings(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let _ = write!(
            out,
            "---\napiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata: {{name: svc-{i}, namespace: {NS}}}\nspec:\n  serviceAccountNames: [svc-{i}]\n  kv: [{{mount: secret, path: {NS}/svc-{i}/*}}]\n  database:\n    - {{mount: database, connection: {NS}_pg, profile: readonly, defaultTTL: 1h, maxTTL: 24h}}\n"
        );
    }
    out
}

fn ready(cp: &ControlPlane) -> Result<usize> {
    let out = run_ok(cp.kubectl().args([
        "get",
        "secretbindings",
        "-n",
        NS,
        "-o",
        r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
    ]))?;
    Ok(out.lines().filter(|l| *l == "True").count())
}

fn totals(op: &OperatorProcess) -> Result<(f64, f64)> {
    Ok((
        op.counter("palisade_operator_vault_requests_total")?,
        op.counter("palisade_operator_vault_writes_total")?,
    ))
}

fn main() -> Result<()> {
    let n: usize = std::env::var("PALISADE_BENCH_N").map_or(Ok(500), |s| s.parse())?;
    let mut opts = Options::new();
    opts.controller_manager = false;
    let cp = ControlPlane::start(&opts)?;
    cp.install_crds(&opts.bin_dir)?;
    let pg = Postgres::start()?;
    let bao = OpenBao::start(&opts.bin_dir, &cp.work_dir.join("openbao"))?;
    bao.bootstrap(&cp, &pg, &[(&format!("{NS}_pg"), NS)], EXAMPLE_TENANCY)?;
    run_ok(cp.kubectl().args(["create", "namespace", NS]))?;
    let file = cp.work_dir.join("bindings.yaml");
    std::fs::write(&file, bindings(n))?;
    run_ok(
        cp.kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&file),
    )?;
    let config = bao.operator_config(EXAMPLE_TENANCY);

    let started = Instant::now();
    let op = OperatorProcess::start(&cp, "bench-vault", &config)?;
    while ready(&cp)? < n {
        if started.elapsed() > Duration::from_mins(15) {
            bail!("not converged after 15 minutes: {}", op.log_tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let converged = started.elapsed();
    let (requests, writes) = totals(&op)?;
    let peak = op.peak_rss_kib().unwrap_or(0);
    drop(op);

    let op = OperatorProcess::start(&cp, "bench-vault-resync", &config)?;
    let resync_started = Instant::now();
    let want = f64::from(u32::try_from(n)?);
    loop {
        let done = op.get("/metrics").map(|(_, m)| {
            m.lines()
                .filter(|l| {
                    l.starts_with("palisade_operator_reconciles_total")
                        && l.contains("SecretBinding")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })?;
        if done >= want {
            break;
        }
        if resync_started.elapsed() > Duration::from_mins(10) {
            bail!("resync did not finish: {}", op.log_tail());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let resync = resync_started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (resync_requests, resync_writes) = totals(&op)?;
    let nf = want;
    println!("SecretBindings against OpenBao, N = {n} (each: KV grant + database role)");
    println!(
        "  operator: start to all {n} Ready: {:.2} s ({:.1} ms per binding)",
        converged.as_secs_f64(),
        converged.as_secs_f64() * 1e3 / nf
    );
    println!(
        "  Vault requests: {requests} ({:.1} per binding), writes: {writes} ({:.1} per binding)",
        requests / nf,
        writes / nf
    );
    println!(
        "  no-op resync after restart: {:.2} s, {resync_requests} Vault requests ({:.1} per binding), {resync_writes} Vault writes (goal 0)",
        resync.as_secs_f64(),
        resync_requests / nf
    );
    println!(
        "  operator peak RSS: {:.1} MiB",
        f64::from(u32::try_from(peak).unwrap_or(u32::MAX)) / 1024.0
    );
    Ok(())
}
