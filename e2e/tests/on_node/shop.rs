//! The example shop as real workloads on the node: its images signed and attested, admitted by
//! the installed webhook under the example ImagePolicy, running the digests that were verified;
//! `orders` uses its SecretBinding from inside its pod, `frontend` cannot.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    run_ok,
    shop::{self, SHOP},
};
use serde_json::Value;

use crate::{Env, on_node::palisade::installed};

/// The step `name` of a workload's `/status`: (ok, value, error).
fn step(status: &Value, name: &str) -> Option<(bool, String, String)> {
    let s = status.get("steps")?.get(name)?;
    Some((
        s["ok"].as_bool().unwrap_or(false),
        s["value"].as_str().unwrap_or_default().to_owned(),
        s["error"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// The shop deployed from `examples/` and `e2e/node/shop.yaml`: every pod runs the digest that
/// was signed; `orders` logs in to OpenBao with its projected ServiceAccount token, reads its
/// secret and a database credential, and that credential logs in to PostgreSQL; `frontend`,
/// presenting its own token for the same role, is refused and reads nothing. Deleting the
/// binding revokes the credential: its PostgreSQL role is gone and `orders` can no longer log in.
pub fn example_shop_uses_its_secret_binding(env: &Env) -> Result<()> {
    let node = &env.node;
    let inst = installed(env)?;
    let cp = node.cp();
    let deployed = shop::deploy_shop(node, inst)?;
    eprintln!(
        "  shop running {:.1} s after its first apply (images built, signed, attested; examples applied)",
        deployed.took.as_secs_f64()
    );
    // Every pod runs exactly the digest that was signed for its service.
    for (svc, digest) in &deployed.images {
        let id = run_ok(cp.kubectl().args([
            "get",
            "pods",
            "-n",
            SHOP,
            "-l",
            &format!("app={svc}"),
            "-o",
            "jsonpath={.items[*].status.containerStatuses[0].imageID}",
        ]))?;
        if id.is_empty() || !id.split_whitespace().all(|i| i.ends_with(digest.as_str())) {
            bail!("{svc} runs {id:?}, not the signed {digest}");
        }
        eprintln!("  {svc}: runs {digest}");
    }
    // orders: login, secret, credential, query.
    let orders = cp.eventually(
        "orders to query PostgreSQL with its credential",
        Duration::from_mins(2),
        || {
            let s = shop::workload_status(node, "orders").ok()?;
            step(&s, "postgres").filter(|p| p.0).map(|_| s)
        },
    )?;
    let (_, kv, _) = step(&orders, "kv").context("orders read no secret")?;
    if !kv.contains("postgres://orders") {
        bail!("orders read {kv:?} from secret/shop/orders/db");
    }
    let (_, user, _) = step(&orders, "database-credential").context("no credential")?;
    let (_, current_user, _) = step(&orders, "postgres").context("no query")?;
    if user.is_empty() || current_user != user {
        bail!("orders queried PostgreSQL as {current_user:?} with credential {user:?}");
    }
    eprintln!(
        "  orders: logged in, read its secret, got credential {user}, queried PostgreSQL as it"
    );
    // frontend: the same role, its own token.
    let frontend = cp.eventually(
        "frontend's login to be refused by the binding",
        Duration::from_mins(1),
        || {
            let s = shop::workload_status(node, "frontend").ok()?;
            step(&s, "login")
                .filter(|l| !l.0 && l.2.contains("not authorized"))
                .map(|_| s)
        },
    )?;
    if step(&frontend, "kv").is_some() {
        bail!("frontend read a secret: {frontend}");
    }
    let (_, _, why) = step(&frontend, "login").context("frontend login")?;
    eprintln!("  frontend: login refused ({why})");
    // Deleting the binding revokes what it issued.
    run_ok(
        cp.kubectl()
            .args(["delete", "secretbinding", "orders", "-n", SHOP]),
    )?;
    let query = format!("SELECT count(*) FROM pg_roles WHERE rolname = '{user}'");
    cp.eventually(
        "the credential's PostgreSQL role dropped",
        Duration::from_mins(1),
        || {
            (inst
                .pg
                .psql(palisade_e2e::postgres::SUPERUSER, &inst.pg.password, &query)
                .ok()?
                == "0")
                .then_some(())
        },
    )?;
    cp.eventually(
        "orders' login refused after the binding was deleted",
        Duration::from_mins(1),
        || {
            let s = shop::workload_status(node, "orders").ok()?;
            step(&s, "login").filter(|l| !l.0).map(|_| ())
        },
    )?;
    eprintln!("  binding deleted: role {user} dropped in PostgreSQL, orders' login refused");
    // Back as it was, for what follows.
    run_ok(
        cp.kubectl()
            .arg("apply")
            .arg("-f")
            .arg(palisade_e2e::repo_root().join("examples/40-secretbinding-orders.yaml")),
    )?;
    Ok(())
}
