//! The control plane behaves like a real cluster where Palisade needs it to
//! (controller-manager: namespaces, ServiceAccounts, Deployment → ReplicaSet → Pod, garbage
//! collection), and its launcher fails clearly and leaves nothing behind.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use palisade_e2e::{ControlPlane, Options, run, run_ok};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "e2e_controlplane::deployment_becomes_pods_and_is_collected",
        deployment_becomes_pods_and_is_collected,
    ),
    (
        "e2e_controlplane::busy_port_is_a_clear_error",
        busy_port_is_a_clear_error,
    ),
    (
        "e2e_controlplane::missing_binary_is_a_clear_error",
        missing_binary_is_a_clear_error,
    ),
    (
        "e2e_controlplane::killed_etcd_is_reported_and_nothing_leaks",
        killed_etcd_is_reported_and_nothing_leaks,
    ),
    (
        "e2e_controlplane::up_serves_the_examples_and_stops_cleanly",
        up_serves_the_examples_and_stops_cleanly,
    ),
];

const DEPLOYMENT: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: registry.example.com/web:1}]
";

fn deployment_becomes_pods_and_is_collected(env: &Env) -> Result<()> {
    env.cp.with_temp_ns("kcm", |ns| {
        let kubectl = |args: &[&str]| {
            let mut c = env.cp.kubectl();
            c.args(["-n", ns]).args(args);
            c
        };
        // The ServiceAccount controller creates `default` in every new namespace.
        env.cp.eventually(
            "the default ServiceAccount",
            Duration::from_secs(30),
            || run_ok(&mut kubectl(&["get", "serviceaccount", "default"])).ok(),
        )?;
        let file = env.cp.work_dir.join(format!("{ns}-deployment.yaml"));
        std::fs::write(&file, DEPLOYMENT)?;
        run_ok(kubectl(&["apply"]).arg("-f").arg(&file))?;
        env.cp.eventually(
            "two pods owned by a ReplicaSet",
            Duration::from_secs(30),
            || {
                let out = run_ok(&mut kubectl(&[
                    "get",
                    "pods",
                    "-l",
                    "app=web",
                    "-o",
                    "jsonpath={range .items[*]}{.metadata.ownerReferences[0].kind}{\"\\n\"}{end}",
                ]))
                .ok()?;
                (out.lines().filter(|l| *l == "ReplicaSet").count() == 2).then_some(())
            },
        )?;
        run_ok(&mut kubectl(&[
            "delete",
            "deployment",
            "web",
            "--wait=false",
        ]))?;
        env.cp.eventually(
            "the garbage collector to remove the pods",
            Duration::from_mins(1),
            || {
                let out = run_ok(&mut kubectl(&[
                    "get", "pods", "-l", "app=web", "-o", "name",
                ]))
                .ok()?;
                out.trim().is_empty().then_some(())
            },
        )
    })
}

fn busy_port_is_a_clear_error(env: &Env) -> Result<()> {
    let holder = TcpListener::bind("127.0.0.1:0")?;
    let port = holder.local_addr()?.port();
    let mut opts = Options::new();
    opts.bin_dir.clone_from(&env.opts.bin_dir);
    opts.apiserver_port = Some(port);
    match ControlPlane::start(&opts) {
        Ok(_) => bail!("started on a busy port"),
        Err(e) => {
            let msg = format!("{e:#}");
            if !(msg.contains(&format!("127.0.0.1:{port}")) && msg.contains("not available")) {
                bail!("unclear busy-port error: {msg}");
            }
        }
    }
    Ok(())
}

fn missing_binary_is_a_clear_error(_env: &Env) -> Result<()> {
    let empty = tempfile::tempdir()?;
    let mut opts = Options::new();
    opts.bin_dir = empty.path().to_path_buf();
    match ControlPlane::start(&opts) {
        Ok(_) => bail!("started without binaries"),
        Err(e) => {
            let msg = format!("{e:#}");
            if !(msg.contains("etcd not found") && msg.contains("e2e/toolchain/build.sh")) {
                bail!("unclear missing-binary error: {msg}");
            }
        }
    }
    Ok(())
}

fn alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie would still show one with state Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
}

fn killed_etcd_is_reported_and_nothing_leaks(env: &Env) -> Result<()> {
    let mut opts = Options::new();
    opts.bin_dir.clone_from(&env.opts.bin_dir);
    opts.controller_manager = false;
    let t = Instant::now();
    let mut cp = ControlPlane::start(&opts)?;
    let work_dir = cp.work_dir.clone();
    eprintln!(
        "  warm control-plane start (etcd + kube-apiserver to /readyz): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let pids = cp.pids();
    let etcd_pid = pids[0];
    run_ok(Command::new("kill").args(["-9", &etcd_pid.to_string()]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let msg = loop {
        if let Err(e) = cp.check_alive() {
            break format!("{e:#}");
        }
        if Instant::now() > deadline {
            bail!("a killed etcd went unnoticed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !(msg.contains("etcd exited") && msg.contains("signal: 9")) {
        bail!("unclear report of a killed etcd: {msg}");
    }
    drop(cp);
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    if !left.is_empty() {
        bail!("processes left after stop: {left:?}");
    }
    if work_dir.exists() {
        bail!("work dir {} left behind", work_dir.display());
    }
    Ok(())
}

/// The quick start's own command: `palisade-e2e up` comes up with the examples applied,
/// reports the kubeconfig, and stops every process on SIGTERM.
fn up_serves_the_examples_and_stops_cleanly(_env: &Env) -> Result<()> {
    let state = tempfile::tempdir()?;
    let state_dir = state.path().join("up");
    let stderr_path = state.path().join("up.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_palisade-e2e"))
        .args(["up", "--state"])
        .arg(&state_dir)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path)?)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut kubeconfig = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(path) = line.trim().strip_prefix("export KUBECONFIG=") {
            kubeconfig = Some(path.to_owned());
            break;
        }
    }
    let Some(kubeconfig) = kubeconfig else {
        let status = child.wait()?;
        bail!(
            "up exited ({status}) without printing the kubeconfig:\n{}",
            palisade_e2e::tail_lines(&stderr_path, 30)
        );
    };
    let pids: Vec<u32> = std::fs::read_to_string(state_dir.join("pids"))?
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let kubectl = palisade_e2e::controlplane::default_bin_dir().join("kubectl");
    let out = run(Command::new(&kubectl)
        .env("KUBECONFIG", Path::new(&kubeconfig))
        .args(["get", "palisade", "-A", "-o", "name"]))?;
    let listed = String::from_utf8_lossy(&out.stdout).lines().count();
    // The example SecretBinding went all the way to OpenBao.
    let role = run(Command::new(&kubectl)
        .env("KUBECONFIG", Path::new(&kubeconfig))
        .args([
            "get",
            "secretbinding",
            "orders",
            "-n",
            "shop",
            "-o",
            "jsonpath={.status.vaultRole}",
        ]))?;
    let role = String::from_utf8_lossy(&role.stdout).into_owned();
    // The webhook loaded the example ImagePolicy and says so in its status.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let policy_ready = loop {
        let out = run(Command::new(&kubectl)
            .env("KUBECONFIG", Path::new(&kubeconfig))
            .args([
                "get",
                "imagepolicy",
                "shop-images",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].reason}"#,
            ]))?;
        let reason = String::from_utf8_lossy(&out.stdout).into_owned();
        if reason == "Loaded" || std::time::Instant::now() > deadline {
            break reason;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
    let status = child.wait()?;
    if listed != 5 {
        bail!("kubectl get palisade -A listed {listed} objects, want the 5 examples");
    }
    if policy_ready != "Loaded" {
        bail!("the example ImagePolicy reports Ready reason {policy_ready:?}, want Loaded");
    }
    if role != "palisade-shop.orders" {
        bail!("the example SecretBinding reports Vault role {role:?}, want palisade-shop.orders");
    }
    if !status.success() {
        bail!("up exited with {status} on SIGTERM");
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    if !left.is_empty() {
        bail!("processes left after up stopped: {left:?}");
    }
    Ok(())
}
