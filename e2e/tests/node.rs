//! End-to-end tests on a real node: kubelet, containerd and runc, the CNI bridge, kube-proxy and
//! kube-scheduler beside the control plane, all in one private network and mount namespace
//! (see `palisade_e2e::node`), started once for this binary and stopped when the tests end.
//! Run with `cargo test -p palisade-e2e --test node`; the binaries come from
//! `e2e/toolchain/build.sh node`.

mod on_node;

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use libtest_mimic::{Arguments, Failed, Trial};
use palisade_e2e::{controlplane::default_bin_dir, node::Node};

/// What the tests share.
pub struct Env {
    /// Palisade installed by its chart, once, by the first test that needs it (dropped before
    /// the node: its relays live in the node's network namespace).
    pub installed: OnceLock<Result<palisade_e2e::shop::Installation, String>>,
    /// The example shop, deployed once, by the first test that needs it.
    pub shop: OnceLock<Result<palisade_e2e::shop::Shop, String>>,
    /// The node and its control plane.
    pub node: Node,
    /// The host's network, firewall and kernel settings before the node started.
    pub host_before: on_node::HostState,
}

type TestFn = fn(&Env) -> anyhow::Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let host_before = on_node::HostState::now();
    let t = Instant::now();
    let started = match Node::start(&default_bin_dir()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("node: cannot start the node: {e:#}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "node: API server ready after {:.1} s, node Ready after {:.1} s, cluster DNS ready after {:.1} s (total {:.1} s)",
        started.timings.apiserver.as_secs_f64(),
        started.timings.node_ready.as_secs_f64(),
        started.timings.dns_ready.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let cgroup_root = started.cgroup_root().to_owned();
    let env = Arc::new(Env {
        installed: OnceLock::new(),
        shop: OnceLock::new(),
        node: started,
        host_before: host_before.clone(),
    });
    let trials = on_node::TESTS
        .iter()
        .map(|&(name, f)| {
            let env = Arc::clone(&env);
            let ignored = on_node::IGNORED.iter().find(|(n, _)| *n == name);
            if let Some((_, why)) = ignored {
                eprintln!("node: {name} is ignored unless --include-ignored: {why}");
            }
            Trial::test(name, move || {
                f(&env).map_err(|e| Failed::from(format!("{e:#}")))
            })
            .with_ignored_flag(ignored.is_some())
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let t = Instant::now();
    drop(env); // stops the node before checking what it left
    eprintln!("node: stopped in {:.1} s", t.elapsed().as_secs_f64());
    // The node stopped: nothing of it may remain on the host.
    let after = on_node::HostState::now();
    let left = palisade_e2e::node::leftovers(&cgroup_root);
    let differences = host_before.differences(&after);
    if !left.is_empty() || !differences.is_empty() {
        eprintln!("node::nothing_left_on_the_host_after_stop FAILED\n{left}{differences}");
        std::process::exit(101);
    }
    eprintln!(
        "node::nothing_left_on_the_host_after_stop ... ok (cgroups, links, routes, iptables, sysctls, mounts)"
    );
    // The quick start's own node, once the tests' node is gone (one node at a time).
    let name = "node::up_node_runs_the_shop_and_stops_cleanly";
    let selected = args
        .filter
        .as_ref()
        .is_none_or(|f| name.contains(f.as_str()))
        && !args.skip.iter().any(|s| name.contains(s.as_str()));
    if selected && !args.list {
        match on_node::up_node_runs_the_shop_and_stops_cleanly(&host_before) {
            Ok(figures) => eprintln!("{name} ... ok ({figures})"),
            Err(e) => {
                eprintln!("{name} FAILED\n{e:#}");
                std::process::exit(101);
            }
        }
    }
    conclusion.exit();
}
