//! Faults on the node, with numbers: a webhook pod killed and the node's registry stopped while
//! pods keep coming.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    node::{Node, REGISTRY, push_binary_image},
    run_ok,
    shop::{NS, SHOP},
};

use crate::{
    Env,
    on_node::{palisade::leader_sum, shop::shop_running},
};

/// One admission of the stream: when, whether the pod was compliant, whether it was admitted,
/// and the refusal's text.
struct Decision {
    at: Instant,
    compliant: bool,
    admitted: bool,
    why: String,
}

/// A pod of the shop created with `--dry-run=server` (admission runs, nothing is stored):
/// whether it was admitted, and the refusal.
fn dry_run(node: &Node, name: &str, image: &str) -> Result<(bool, String)> {
    let out = crate::on_node::palisade::dry_run(
        node,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {SHOP}}}\nspec:\n  serviceAccountName: payments\n  containers: [{{name: app, image: {image}}}]\n"
        ),
    )?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A signed and a never-signed image of the shop, one after the other, until `stop` (at most
/// 3,000 of each).
fn stream(node: &Node, stop: &AtomicBool, log: &Mutex<Vec<Decision>>) {
    let signed = format!("{REGISTRY}/shop/payments:v1");
    let unsigned = format!("{REGISTRY}/shop/unsigned:v1");
    for i in 0..3_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        for (compliant, image) in [(true, &signed), (false, &unsigned)] {
            let kind = if compliant { "good" } else { "bad" };
            if let Ok((admitted, why)) = dry_run(node, &format!("{kind}-{i}"), image)
                && let Ok(mut l) = log.lock()
            {
                l.push(Decision {
                    at: Instant::now(),
                    compliant,
                    admitted,
                    why,
                });
            }
        }
    }
}

/// Counts of the decisions in `[from, to)`: (compliant admitted, compliant refused, violating
/// refused, violating admitted).
fn counts(log: &[Decision], from: Instant, to: Instant) -> (usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0);
    for d in log.iter().filter(|d| d.at >= from && d.at < to) {
        match (d.compliant, d.admitted) {
            (true, true) => c.0 += 1,
            (true, false) => c.1 += 1,
            (false, false) => c.2 += 1,
            (false, true) => c.3 += 1,
        }
    }
    c
}

/// While signed and unsigned shop pods keep coming: one webhook pod is killed (no grace), then
/// the node's registry is stopped (SIGSTOP: connections hang) for 20 s and resumed. No unsigned
/// pod is admitted at any time; signed pods are admitted again soon after the registry returns
/// (five in a row); the counts of each phase and that time are printed.
pub fn webhook_killed_and_registry_stopped_under_a_stream_of_pods(env: &Env) -> Result<()> {
    let node = &env.node;
    shop_running(env)?;
    let cp = node.cp();
    push_binary_image(
        &node.registry,
        &node.work_dir,
        &node.bin("shop-app"),
        "bin/shop-app",
        ("shop/unsigned", "v1"),
        &["--entrypoint=/bin/shop-app"],
    )?;
    let log = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let registry = node.registry.pid().to_string();
    let signal = |sig: &str| run_ok(Command::new("kill").args([sig, &registry]));
    let t0 = Instant::now();
    let marks = std::thread::scope(|s| -> Result<[Instant; 4]> {
        s.spawn(|| stream(node, &stop, &log));
        let phases = (|| -> Result<[Instant; 4]> {
            std::thread::sleep(Duration::from_secs(5));
            let pod = run_ok(cp.kubectl().args([
                "get",
                "pods",
                "-n",
                NS,
                "-l",
                "app.kubernetes.io/component=webhook",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ]))?;
            let killed = Instant::now();
            run_ok(cp.kubectl().args([
                "delete",
                "pod",
                pod.trim(),
                "-n",
                NS,
                "--grace-period=0",
                "--force",
            ]))?;
            std::thread::sleep(Duration::from_secs(15));
            let stopped = Instant::now();
            signal("-STOP")?;
            std::thread::sleep(Duration::from_secs(20));
            let resumed = Instant::now();
            signal("-CONT")?;
            std::thread::sleep(Duration::from_secs(30));
            Ok([killed, stopped, resumed, Instant::now()])
        })();
        // Whatever happened, the registry runs again and the stream ends.
        let _ = signal("-CONT");
        stop.store(true, Ordering::Relaxed);
        phases
    })?;
    let log = log
        .into_inner()
        .map_err(|_| anyhow::anyhow!("stream log"))?;
    let [killed, stopped, resumed, end] = marks;
    let phase = |name: &str, from: Instant, to: Instant| {
        let (ca, cr, vr, va) = counts(&log, from, to);
        eprintln!(
            "  {name}: {ca} signed admitted, {cr} signed refused, {vr} unsigned refused, {va} unsigned admitted"
        );
        va
    };
    let admitted_bad = phase("before", t0, killed)
        + phase("webhook pod killed", killed, stopped)
        + phase("registry stopped", stopped, resumed)
        + phase("registry resumed", resumed, end);
    if admitted_bad > 0 {
        let example = log
            .iter()
            .find(|d| !d.compliant && d.admitted)
            .map(|d| d.at.duration_since(t0).as_secs_f64());
        bail!("{admitted_bad} unsigned pods were admitted (first at {example:?} s)");
    }
    // Every refusal of an unsigned pod names a reason; count those that are Palisade's own.
    let by_palisade = log
        .iter()
        .filter(|d| !d.compliant && d.why.contains("palisade"))
        .count();
    // Back: the first time five signed pods in a row are admitted after the resume.
    let mut run = 0;
    let mut back = None;
    for d in log.iter().filter(|d| d.compliant && d.at >= resumed) {
        run = if d.admitted { run + 1 } else { 0 };
        if run == 5 {
            back = Some(d.at.duration_since(resumed));
            break;
        }
    }
    let Some(back) = back else {
        let last = log.iter().rev().find(|d| d.compliant && !d.admitted);
        bail!(
            "signed pods not admitted again within 30 s of the registry's return; last refusal: {}",
            last.map(|d| d.why.as_str()).unwrap_or_default()
        );
    };
    eprintln!(
        "  signed pods admitted again (five in a row) {:.1} s after the registry resumed; {by_palisade} unsigned refusals carried Palisade's reason",
        back.as_secs_f64()
    );
    Ok(())
}

/// A JSON request to etcd's HTTP gateway inside the node; the answer's body.
fn etcd(node: &Node, path: &str, body: &str) -> Result<serde_json::Value> {
    use std::io::Read as _;
    let mut s = node
        .holder()
        .connect("127.0.0.1:2379".parse()?, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        bail!("etcd {path}: {head}\n{body}");
    }
    Ok(serde_json::from_str(body)?)
}

/// Compacts etcd at its current revision (physically): every watch resuming from an older
/// resource version is answered 410 Gone. The revision.
fn compact(node: &Node) -> Result<String> {
    // The key "/" base64-encoded; any read answers with the store's revision.
    let range = etcd(node, "/v3/kv/range", r#"{"key":"Lw==","limit":1}"#)?;
    let rev = range["header"]["revision"]
        .as_str()
        .context("etcd's revision")?
        .to_owned();
    etcd(
        node,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{rev}","physical":true}}"#),
    )?;
    Ok(rev)
}

const SCALE: &str = "scale";
const POLICIES: u32 = 1_000;

/// How many of the scale namespace's AuthPolicies are Ready.
fn ready_count(node: &Node) -> Result<usize> {
    let out = run_ok(node.cp().kubectl().args([
        "get",
        "authpolicies",
        "-n",
        SCALE,
        "-o",
        r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
    ]))?;
    Ok(out.lines().filter(|l| *l == "True").count())
}

/// Why the scale namespace's AuthPolicies that are not Ready are not (reason: count), and the
/// operator pods' last log lines.
fn not_ready(node: &Node) -> String {
    let reasons = run_ok(node.cp().kubectl().args([
        "get",
        "authpolicies",
        "-n",
        SCALE,
        "-o",
        r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}/{.status.conditions[?(@.type=="Ready")].reason}{"\n"}{end}"#,
    ]))
    .unwrap_or_default();
    let mut by = std::collections::BTreeMap::new();
    for r in reasons.lines().filter(|r| !r.starts_with("True")) {
        *by.entry(r.to_owned()).or_insert(0) += 1;
    }
    let logs = run_ok(node.cp().kubectl().args([
        "logs",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/component=operator",
        "--tail=15",
        "--prefix",
    ]))
    .unwrap_or_else(|e| format!("(no logs: {e:#})"));
    format!("not Ready by reason: {by:?}\noperator logs:\n{logs}")
}

/// Generated objects in the scale namespace, counted by owning AuthPolicy.
fn generated_by_owner(node: &Node) -> Result<std::collections::BTreeMap<String, usize>> {
    let out = run_ok(node.cp().kubectl().args([
        "get",
        "authorizationpolicies.security.istio.io,peerauthentications.security.istio.io,requestauthentications.security.istio.io",
        "-n",
        SCALE,
        "-o",
        r"jsonpath={range .items[*]}{.metadata.labels.palisade\.dev/owner-name}{'\n'}{end}",
    ]))?;
    let mut by = std::collections::BTreeMap::new();
    for owner in out.lines() {
        *by.entry(owner.to_owned()).or_insert(0) += 1;
    }
    Ok(by)
}

/// The operator's `list` requests for AuthPolicies in the API server's audit log, from line
/// `from` on; and the log's length.
fn operator_lists(node: &Node, from: usize) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(node.cp().audit_log())?;
    let lines: Vec<&str> = text.lines().collect();
    let lists = lines
        .iter()
        .skip(from)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["verb"] == "list"
                && e["objectRef"]["resource"] == "authpolicies"
                && e["user"]["username"]
                    == "system:serviceaccount:palisade-system:palisade-operator"
        })
        .count();
    Ok((lists, lines.len()))
}

/// Applies the 1,000 policies, again until `kubectl` succeeds (a restart may cut one short).
fn apply_all(node: &Node, file: &std::path::Path) -> Result<()> {
    let mut last = String::new();
    for _ in 0..5 {
        match run_ok(
            node.cp()
                .kubectl()
                .args(["apply", "--server-side", "-f"])
                .arg(file),
        ) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    bail!("applying the policies: {last}")
}

/// 1,000 AuthPolicies applied; once 100 are Ready, etcd is compacted and the API server
/// restarted, so the installed operator's watches expire and it lists again. All 1,000 become
/// Ready, each with exactly the objects one policy generates (none lost, none twice). Then, with
/// everything converged, compaction and restart again: the operator writes nothing. Prints the
/// counts and times.
pub fn apiserver_restart_and_compaction_while_converging(env: &Env) -> Result<()> {
    let node = &env.node;
    crate::on_node::palisade::installed(env)?;
    let cp = node.cp();
    run_ok(cp.kubectl().args(["create", "namespace", SCALE]))?;
    let mut yaml = String::new();
    for i in 0..POLICIES {
        let _ = write!(
            yaml,
            "apiVersion: palisade.dev/v1alpha1\nkind: AuthPolicy\nmetadata: {{name: p-{i:04}, namespace: {SCALE}}}\nspec:\n  selector: {{matchLabels: {{app: p-{i:04}}}}}\n  rules: [{{from: [{{serviceAccount: {{name: frontend}}}}], to: [{{ports: [8080]}}]}}]\n---\n"
        );
    }
    let file = node.work_dir.join("scale.yaml");
    std::fs::write(&file, yaml)?;
    let (_, writes_before) = leader_sum(node, "palisade_operator_api_writes_total")?;
    let t = Instant::now();
    let (ready_at_fault, rev, away, mark) = std::thread::scope(|s| -> Result<_> {
        let applying = s.spawn(|| apply_all(node, &file));
        cp.eventually("100 AuthPolicies Ready", Duration::from_mins(3), || {
            (ready_count(node).ok()? >= 100).then_some(())
        })?;
        let ready = ready_count(node)?;
        let (_, mark) = operator_lists(node, 0)?;
        let rev = compact(node)?;
        let away = cp.restart("kube-apiserver")?;
        applying
            .join()
            .map_err(|_| anyhow::anyhow!("the apply thread panicked"))??;
        // What a restart cut short is applied again: the same objects.
        apply_all(node, &file)?;
        Ok((ready, rev, away, mark))
    })?;
    eprintln!(
        "  {POLICIES} AuthPolicies applied; {ready_at_fault} Ready when etcd was compacted at revision {rev} and the API server restarted (back in {:.1} s)",
        away.as_secs_f64()
    );
    cp.eventually("every AuthPolicy Ready", Duration::from_mins(5), || {
        (ready_count(node).ok()? == POLICIES as usize).then_some(())
    })
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", not_ready(node)))?;
    let converged = t.elapsed();
    let by = generated_by_owner(node)?;
    let per = by.get("p-0000").copied().unwrap_or(0);
    let odd: Vec<_> = by.iter().filter(|(_, n)| **n != per).take(5).collect();
    if by.len() != POLICIES as usize || per == 0 || !odd.is_empty() {
        bail!(
            "generated objects for {} owners (want {POLICIES}), {per} for p-0000, differing: {odd:?}",
            by.len()
        );
    }
    let (leader, writes) = leader_sum(node, "palisade_operator_api_writes_total")?;
    let (lists, mark) = operator_lists(node, mark)?;
    eprintln!(
        "  all {POLICIES} Ready {:.1} s after the first apply; {} generated objects, {per} per policy, none missing or twice; {} writes by {leader}; {lists} fresh lists of AuthPolicies after the restart",
        converged.as_secs_f64(),
        by.values().sum::<usize>(),
        writes - writes_before
    );
    if lists == 0 {
        bail!("the operator did not list AuthPolicies again after the compaction and restart");
    }
    // Converged: a second compaction and restart cost no write (the watches resume, or list
    // again when their resource version expired).
    let (_, reconciles) = leader_sum(node, "palisade_operator_reconciles_total")?;
    compact(node)?;
    cp.restart("kube-apiserver")?;
    std::thread::sleep(Duration::from_secs(30));
    let (_, after) = leader_sum(node, "palisade_operator_api_writes_total")?;
    let (_, total) = leader_sum(node, "palisade_operator_reconciles_total")?;
    let (lists, _) = operator_lists(node, mark)?;
    eprintln!(
        "  converged, compacted and restarted again: {lists} lists, {} reconciles, {} writes in the 30 s after",
        total - reconciles,
        after - writes
    );
    if after > writes {
        bail!("{} writes for objects already converged", after - writes);
    }
    run_ok(
        cp.kubectl()
            .args(["delete", "namespace", SCALE, "--wait=false"]),
    )?;
    Ok(())
}
