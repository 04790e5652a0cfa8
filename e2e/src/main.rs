//! `palisade-e2e up`: starts a local control plane, installs Palisade's and the third-party CRDs,
//! applies `examples/`, prints the kubeconfig path, and stays up until interrupted (Ctrl-C or
//! SIGTERM), then stops every process it started. With `--node`, Palisade runs as pods on a
//! real node instead, installed by its chart, and the example shop runs as real workloads.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane, Options,
    controlplane::default_bin_dir,
    envoygateway::{EnvoyGateway, RateLimits},
    node::{Node, REGISTRY},
    openbao::{EXAMPLE_TENANCY, OpenBao},
    operator::OperatorProcess,
    postgres::Postgres,
    repo_root, run_ok, shop,
    webhook::WebhookProcess,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("values-doc") {
        let path = palisade_e2e::repo_root().join("charts/palisade/values.schema.json");
        let schema = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let Some(schema) = schema else {
            eprintln!("palisade-e2e: cannot read {}", path.display());
            return ExitCode::FAILURE;
        };
        print!("{}", palisade_e2e::chartdoc::values_reference(&schema));
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("advisories") {
        return advisories(&args[1..]);
    }
    if args.first().map(String::as_str) != Some("up") {
        eprintln!(
            "usage: palisade-e2e up [--state DIR] [--port PORT] [--no-examples] [--node]\n\
             \x20      palisade-e2e values-doc   (docs/install.md's chart values reference)\n\
             \x20      palisade-e2e advisories [--manifest-path DIR] [--exceptions FILE] [--today YYYY-MM-DD]\n\
             \x20                                (the dependency-advisory gate)\n\
             Starts etcd, kube-apiserver and kube-controller-manager on 127.0.0.1 with\n\
             Palisade's CRDs and examples applied, until interrupted; with --node, a real\n\
             node too, Palisade installed by its chart and the example shop running."
        );
        return ExitCode::from(2);
    }
    match up(&args[1..]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `palisade-e2e advisories`: the dependency-advisory gate on the workspace (or the crate in
/// `--manifest-path DIR`), with the exceptions in `--exceptions FILE` (default
/// `security/advisory-exceptions.yaml`) as of `--today` (default: today, UTC).
fn advisories(args: &[String]) -> ExitCode {
    let root = repo_root();
    let mut manifest_dir = root.clone();
    let mut exceptions = root.join(palisade_e2e::advisories::EXCEPTIONS);
    let mut today = palisade_e2e::advisories::today();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = it.next().cloned();
        match (a.as_str(), value) {
            ("--manifest-path", Some(v)) => manifest_dir = PathBuf::from(v),
            ("--exceptions", Some(v)) => exceptions = PathBuf::from(v),
            ("--today", Some(v)) => today = v,
            _ => {
                eprintln!("palisade-e2e advisories: unknown or incomplete argument {a:?}");
                return ExitCode::from(2);
            }
        }
    }
    match palisade_e2e::advisories::gate(&manifest_dir, &exceptions, &today) {
        Ok(report) => {
            eprintln!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("palisade-e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--state DIR`, `--port PORT`, `--no-examples`, `--node`: control plane options, whether to
/// apply the examples, and whether to run Palisade on a real node.
fn parse_args(args: &[String]) -> Result<(Options, bool, bool)> {
    let mut opts = Options::new();
    let mut examples = true;
    let mut node = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--state" => {
                let dir = PathBuf::from(it.next().context("--state needs a directory")?);
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .with_context(|| format!("clearing {}", dir.display()))?;
                }
                opts.work_dir = Some(dir);
                opts.keep_dir = true;
            }
            "--port" => {
                let p = it.next().context("--port needs a number")?;
                opts.apiserver_port = Some(p.parse().with_context(|| format!("bad port {p:?}"))?);
            }
            "--no-examples" => examples = false,
            "--node" => node = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    opts.bin_dir = default_bin_dir();
    Ok((opts, examples, node))
}

fn up(args: &[String]) -> Result<()> {
    let (opts, examples, node) = parse_args(args)?;
    if node {
        return up_node(&opts, examples);
    }

    let t = Instant::now();
    let cp = ControlPlane::start(&opts)?;
    eprintln!(
        "[up] control plane ready: API server /readyz after {:.1} s, controller-manager after {:.1} s",
        cp.ready_after.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let n = cp.install_crds(&opts.bin_dir)?;
    eprintln!(
        "[up] {n} CRDs established ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    if examples {
        let out = run_ok(
            cp.kubectl()
                .args([
                    "apply",
                    "--server-side",
                    "--field-manager=palisade-quickstart",
                    "-f",
                ])
                .arg(repo_root().join("examples")),
        )?;
        eprint!("{out}");
    }
    run_ok(
        cp.kubectl()
            .args(["create", "namespace", "palisade-system"]),
    )?;
    // The example Gateway's controller: it accepts (or refuses) the rate limits Palisade writes.
    let eg = EnvoyGateway::start(&cp, &opts.bin_dir, RateLimits::Global)?;
    eprintln!(
        "[up] Envoy Gateway's controller running (log {})",
        eg.log.display()
    );
    // Vault for SecretBindings: OpenBao with a PostgreSQL behind its database engine,
    // bootstrapped once with the root token; the operator then logs in with its ServiceAccount.
    let pg = Postgres::start()?;
    let bao = OpenBao::start(&opts.bin_dir, &cp.work_dir.join("openbao"))?;
    bao.bootstrap(&cp, &pg, &[("orders-pg", "shop")], EXAMPLE_TENANCY)?;
    eprintln!(
        "[up] OpenBao serving {} (CA {}), PostgreSQL on 127.0.0.1:{}",
        bao.addr,
        bao.ca.display(),
        pg.port
    );
    let operator = OperatorProcess::start(
        &cp,
        "up",
        &format!(
            "leaderElection: {{enabled: true, leaseName: palisade-operator, leaseNamespace: palisade-system, leaseSeconds: 15}}\n{}",
            bao.operator_config(EXAMPLE_TENANCY)
        ),
    )?;
    eprintln!(
        "[up] palisade-operator running (metrics on http://{}/metrics, log {})",
        operator.metrics_addr,
        operator.log.display()
    );
    let webhook = WebhookProcess::start(&cp, "up", "")?;
    webhook.register_cluster_wide(&cp, "palisade")?;
    eprintln!(
        "[up] palisade-webhook serving https://127.0.0.1:{} (log {})",
        webhook.port,
        webhook.log.display()
    );
    if examples {
        wait_examples_ready(&cp)?;
        eprint!("{}", run_ok(cp.kubectl().args(["get", "palisade", "-A"]))?);
    }
    let mut pids = cp.pids();
    pids.push(operator.pid());
    pids.push(webhook.pid());
    pids.push(bao.pid());
    pids.push(pg.pid());
    pids.push(eg.pid());
    std::fs::write(
        cp.work_dir.join("pids"),
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    println!(
        "\nPalisade's local control plane is up ({:.1} s).\n  export KUBECONFIG={}\n  kubectl get palisade -A\nPress Ctrl-C to stop it.",
        t.elapsed().as_secs_f64(),
        cp.kubeconfig.display()
    );
    wait_for_signal()?;
    eprintln!("[up] stopping");
    drop(webhook);
    drop(operator);
    drop(bao);
    drop(pg);
    drop(eg);
    drop(cp);
    Ok(())
}

/// `up --node`: a real node (kubelet, containerd, kube-proxy, kube-scheduler) beside the control
/// plane, Palisade installed by its chart from its release images, OpenBao and PostgreSQL on the
/// host, and (unless `--no-examples`) the example shop running as real workloads. The kubeconfig
/// is copied to the state directory (when given).
fn up_node(opts: &Options, examples: bool) -> Result<()> {
    let t = Instant::now();
    let node = Node::start(&opts.bin_dir)?;
    eprintln!(
        "[up] node Ready after {:.1} s (API server after {:.1} s, cluster DNS after {:.1} s)",
        node.timings.node_ready.as_secs_f64(),
        node.timings.apiserver.as_secs_f64(),
        node.timings.dns_ready.as_secs_f64()
    );
    let kubeconfig = match &opts.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let copy = dir.join("kubeconfig");
            std::fs::copy(&node.cp().kubeconfig, &copy)?;
            copy
        }
        None => node.cp().kubeconfig.clone(),
    };
    let inst = shop::install(&node)?;
    eprintln!(
        "[up] Palisade installed by its chart after {:.1} s (operator {}, webhook {})",
        t.elapsed().as_secs_f64(),
        inst.operator,
        inst.webhook
    );
    // After the CRDs the installation brought.
    let eg = EnvoyGateway::start(node.cp(), &opts.bin_dir, RateLimits::Global)?;
    eprintln!(
        "[up] Envoy Gateway's controller running (log {})",
        eg.log.display()
    );
    if examples {
        let running = shop::deploy_shop(&node, &inst)?;
        eprintln!(
            "[up] the example shop is running after {:.1} s:",
            t.elapsed().as_secs_f64()
        );
        for (svc, digest) in &running.images {
            eprintln!("[up]   {svc}: {REGISTRY}/shop/{svc}@{digest}");
        }
    }
    println!(
        "\nA node with Palisade and the example shop is up ({:.1} s).\n  export KUBECONFIG={}\n  kubectl get pods -A\n  kubectl get pods -n shop -o custom-columns=POD:.metadata.name,IMAGE:.spec.containers[0].image,RUNS:.status.containerStatuses[0].imageID\n  kubectl get palisade -A\nPress Ctrl-C to stop it.",
        t.elapsed().as_secs_f64(),
        kubeconfig.display()
    );
    wait_for_signal()?;
    eprintln!("[up] stopping");
    drop(inst);
    drop(eg);
    drop(node);
    Ok(())
}

/// Waits until every example AuthPolicy, RateLimitPolicy and SecretBinding reports Ready.
fn wait_examples_ready(cp: &ControlPlane) -> Result<()> {
    cp.eventually(
        "the example policies to become Ready",
        std::time::Duration::from_mins(1),
        || {
            let out = run_ok(cp.kubectl().args([
                "get",
                "authpolicies,ratelimitpolicies,secretbindings",
                "-A",
                "-o",
                r#"jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
            ]))
            .ok()?;
            let lines: Vec<&str> = out.lines().collect();
            (!lines.is_empty() && lines.iter().all(|l| *l == "True")).then_some(())
        },
    )
}

fn wait_for_signal() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    })
}
