//! The real API server accepts every example and enforces every CRD rule with the message the
//! schema promises, through `kubectl apply` as a user would run it.

use anyhow::{Result, bail};
use palisade_api::fixtures::{CelFixture, cel_fixture_dir, cel_fixtures};
use palisade_e2e::{accepts, rejects, repo_root, run, run_ok};

use crate::{Env, TestFn};

pub const TESTS: &[(&str, TestFn)] = &[
    ("admit_crds::examples_are_accepted", examples_are_accepted),
    (
        "admit_crds::cel_rules_reject_with_their_message",
        cel_rules_reject_with_their_message,
    ),
    (
        "admit_crds::palisade_category_lists_every_kind",
        palisade_category_lists_every_kind,
    ),
];

fn examples_are_accepted(env: &Env) -> Result<()> {
    let out = run(env
        .cp
        .kubectl()
        .args(["apply", "--server-side", "--field-manager=e2e", "-f"])
        .arg(repo_root().join("examples")))?;
    accepts(&out, "kubectl apply -f examples/")?;
    for (kind, name, ns) in [
        ("authpolicy", "orders", Some("shop")),
        ("authpolicy", "payments", Some("shop")),
        ("ratelimitpolicy", "orders-api", Some("shop")),
        ("secretbinding", "orders", Some("shop")),
        ("imagepolicy", "shop-images", None),
        (
            "httproute.gateway.networking.k8s.io",
            "orders-api",
            Some("shop"),
        ),
    ] {
        let mut cmd = env.cp.kubectl();
        cmd.args(["get", kind, name]);
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        run_ok(&mut cmd)?;
    }
    Ok(())
}

fn fixtures() -> Result<Vec<CelFixture>> {
    let dir = cel_fixture_dir();
    let out = cel_fixtures(&dir)?;
    if out.len() < 40 {
        bail!(
            "expected the full fixture set in {}, found {}",
            dir.display(),
            out.len()
        );
    }
    Ok(out)
}

fn cel_rules_reject_with_their_message(env: &Env) -> Result<()> {
    let fixtures = fixtures()?;
    env.cp.with_temp_ns("cel", |ns| {
        let mut failures = Vec::new();
        for f in &fixtures {
            let out = env.cp.apply_file(&f.path, Some(ns))?;
            let what = format!("{}", f.path.display());
            let verdict = if f.expect_ok {
                accepts(&out, &what)
            } else {
                rejects(&out, &what, &[&f.field, &f.message])
            };
            if let Err(e) = verdict {
                failures.push(format!("{e:#}"));
            }
            if f.expect_ok && f.object["kind"] == "ImagePolicy" {
                run_ok(env.cp.kubectl().args(["delete", "imagepolicy", &f.name]))?;
            }
        }
        if failures.is_empty() {
            eprintln!("  {} fixtures checked through kubectl", fixtures.len());
            Ok(())
        } else {
            bail!("{}", failures.join("\n"))
        }
    })
}

fn palisade_category_lists_every_kind(env: &Env) -> Result<()> {
    let out =
        run_ok(
            env.cp
                .kubectl()
                .args(["api-resources", "--categories=palisade", "-o", "name"]),
        )?;
    let mut kinds: Vec<&str> = out.lines().collect();
    kinds.sort_unstable();
    let want = [
        "authpolicies.palisade.dev",
        "imagepolicies.palisade.dev",
        "ratelimitpolicies.palisade.dev",
        "secretbindings.palisade.dev",
    ];
    if kinds != want {
        bail!("category palisade lists {kinds:?}, want {want:?}");
    }
    let explain = run_ok(
        env.cp
            .kubectl()
            .args(["explain", "ratelimitpolicy.spec.limits.burst"]),
    )?;
    if !explain.contains("Extra requests a client may send at once") {
        bail!("kubectl explain does not show the field docs: {explain}");
    }
    Ok(())
}
