//! End-to-end tests against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager) started once for this binary and stopped when the tests end, also
//! when one fails. Run with `cargo test -p palisade-e2e`; the binaries come from
//! `e2e/toolchain/build.sh`.

mod admit_crds;
mod admit_webhook;
mod adversarial;
mod chart;
mod e2e_controlplane;
mod e2e_operator;
mod e2e_vault;
mod images;
mod mesh;
mod policies;
mod release;
mod reports;

use std::{sync::Arc, time::Instant};

use anyhow::Result;
use libtest_mimic::{Arguments, Failed, Trial};
use palisade_e2e::{ControlPlane, Options};

/// The shared control plane every test talks to.
pub struct Env {
    /// The control plane.
    pub cp: ControlPlane,
    /// How it was started (binary directory for further control planes).
    pub opts: Options,
}

type TestFn = fn(&Env) -> Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    // Tests share one control plane and start operators that watch every namespace: run them
    // one at a time so each sees only its own operator's writes.
    args.test_threads.get_or_insert(1);
    let tests: Vec<(&str, TestFn)> = [
        adversarial::TESTS,
        admit_crds::TESTS,
        admit_webhook::TESTS,
        chart::TESTS,
        e2e_controlplane::TESTS,
        e2e_operator::TESTS,
        e2e_vault::TESTS,
        images::TESTS,
        mesh::TESTS,
        policies::TESTS,
        release::TESTS,
        reports::TESTS,
    ]
    .concat();

    let t = Instant::now();
    let env = match start() {
        Ok(env) => Arc::new(env),
        Err(e) => {
            eprintln!("e2e: cannot start the control plane: {e:#}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "e2e: control plane ready in {:.1} s (API server /readyz after {:.1} s), CRDs installed",
        t.elapsed().as_secs_f64(),
        env.cp.ready_after.as_secs_f64()
    );

    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            let env = Arc::clone(&env);
            Trial::test(name, move || {
                f(&env).map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(env); // stops the control plane before exiting
    conclusion.exit();
}

fn start() -> Result<Env> {
    let opts = Options::new();
    let cp = ControlPlane::start(&opts)?;
    cp.install_crds(&opts.bin_dir)?;
    Ok(Env { cp, opts })
}
