//! SecretBindings against a real OpenBao and a real PostgreSQL: a workload logs in with its
//! ServiceAccount token, reads what the binding allows and nothing else, gets database
//! credentials that really log in and expire; drift is repaired, a no-op resync writes nothing,
//! an outage loses no update, and deletion revokes everything without ever hanging.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    ControlPlane, accepts,
    openbao::{EXAMPLE_TENANCY, OpenBao},
    operator::OperatorProcess,
    postgres::Postgres,
    rejects, repo_root, run, run_ok,
};
use serde_json::Value;

use crate::{Env, TestFn};

mod attacks;

pub const TESTS: &[(&str, TestFn)] = &[
    (
        "e2e_vault::secret_binding_lifecycle",
        secret_binding_lifecycle,
    ),
    (
        "e2e_vault::tenancy_refusals_write_nothing",
        tenancy_refusals_write_nothing,
    ),
    (
        "e2e_vault::tenant_and_operator_attacks_get_nothing",
        attacks::tenant_and_operator_attacks_get_nothing,
    ),
];

const WAIT: Duration = Duration::from_mins(1);

pub(super) struct Rig {
    pub(super) pg: Postgres,
    pub(super) bao: OpenBao,
    pub(super) op: OperatorProcess,
}

pub(super) fn rig(env: &Env, tag: &str) -> Result<Rig> {
    let cp = &env.cp;
    let pg = Postgres::start()?;
    let bao = OpenBao::start(&env.opts.bin_dir, &cp.work_dir.join(format!("bao-{tag}")))?;
    let extra = format!("{EXAMPLE_TENANCY}  sweepIntervalSeconds: 10\n");
    bao.bootstrap(
        cp,
        &pg,
        &[("orders-pg", "shop"), ("shop_reports", "shop")],
        &extra,
    )?;
    let op = OperatorProcess::start(cp, tag, &bao.operator_config(&extra))?;
    Ok(Rig { pg, bao, op })
}

pub(super) fn binding(cp: &ControlPlane, ns: &str, name: &str) -> Option<Value> {
    let out = run(cp
        .kubectl()
        .args(["get", "secretbinding", name, "-n", ns, "-o", "json"]))
    .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn condition(obj: &Value, type_: &str) -> (String, String, String) {
    let c = obj["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null);
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    (s("status"), s("reason"), s("message"))
}

pub(super) fn wait_condition(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
) -> Result<(String, String, String)> {
    cp.eventually(&format!("{ns}/{name} {type_}={status}"), WAIT, || {
        let obj = binding(cp, ns, name)?;
        let c = condition(&obj, type_);
        (c.0 == status).then_some(c)
    })
}

pub(super) fn apply(
    cp: &ControlPlane,
    ns: &str,
    tag: &str,
    yaml: &str,
) -> Result<std::process::Output> {
    let file = cp.work_dir.join(format!("sb-{ns}-{tag}.yaml"));
    std::fs::write(&file, yaml)?;
    run(cp.kubectl().args(["apply", "-n", ns, "-f"]).arg(&file))
}

fn vault_totals(op: &OperatorProcess) -> Result<(f64, f64)> {
    Ok((
        op.counter("palisade_operator_vault_requests_total")?,
        op.counter("palisade_operator_vault_writes_total")?,
    ))
}

/// `database/creds/<role>` as a client: (username, password, lease id).
pub(super) fn creds(bao: &OpenBao, token: &str, role: &str) -> Result<(String, String, String)> {
    let out = bao.bao(
        token,
        &["read", "-format=json", &format!("database/creds/{role}")],
    )?;
    let v: Value = serde_json::from_str(&out)?;
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{p} in {out}"))
    };
    Ok((s("/data/username")?, s("/data/password")?, s("/lease_id")?))
}

#[allow(clippy::too_many_lines)]
fn secret_binding_lifecycle(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let Rig { pg, bao, op } = rig(env, "vault")?;
    let result = (|| -> Result<()> {
        let examples = repo_root().join("examples");
        run_ok(
            cp.kubectl()
                .arg("apply")
                .arg("-f")
                .arg(examples.join("00-shop-namespace.yaml")),
        )?;
        let _ = run(cp
            .kubectl()
            .args(["create", "serviceaccount", "orders", "-n", "shop"]));
        let _ = run(cp
            .kubectl()
            .args(["create", "serviceaccount", "intruder", "-n", "shop"]));
        pg.psql(
            "postgres",
            &pg.password,
            "CREATE TABLE IF NOT EXISTS orders (id int); GRANT SELECT ON orders TO PUBLIC;",
        )?;
        bao.root(&[
            "kv",
            "put",
            "secret/shop/orders/db",
            "url=postgres://orders",
        ])?;
        bao.root(&["kv", "put", "secret/payments/card-key", "key=4111"])?;

        // The example binding, as a user applies it.
        run_ok(
            cp.kubectl()
                .arg("apply")
                .arg("-f")
                .arg(examples.join("40-secretbinding-orders.yaml")),
        )?;
        wait_condition(cp, "shop", "orders", "Ready", "True")?;
        let role = "palisade-shop.orders";
        let db_role = "palisade-shop.orders.orders-pg";
        let obj = binding(cp, "shop", "orders").context("binding")?;
        if obj["status"]["vaultRole"] != role
            || obj["status"]["databaseRoles"][0] != format!("database/roles/{db_role}")
        {
            bail!("status does not name what was written: {}", obj["status"]);
        }
        // The policy is this binding's own: its name carries the binding's uid.
        let policy = obj["status"]["vaultPolicy"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        if policy != format!("{role}.{}", &uid[..8]) {
            bail!("policy {policy:?} does not carry uid {uid}");
        }

        // The workload logs in with its own ServiceAccount token and reads its secret...
        let token = bao.login(cp, "shop", "orders", role)?;
        let url = bao.bao(
            &token,
            &["kv", "get", "-field=url", "secret/shop/orders/db"],
        )?;
        if url != "postgres://orders" {
            bail!("read {url:?}");
        }
        // ...but nothing outside the binding.
        let out = bao.bao_output(&token, &["kv", "get", "secret/payments/card-key"])?;
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("permission denied")
        {
            bail!(
                "a path outside the binding was readable: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        // Another ServiceAccount of the same namespace cannot log in to the role.
        if bao.login(cp, "shop", "intruder", role).is_ok() {
            bail!("a ServiceAccount not named in the binding logged in");
        }

        // Database credentials that really log in to PostgreSQL.
        let (user, password, lease) = creds(&bao, &token, db_role)?;
        let n = pg.psql(&user, &password, "SELECT count(*) FROM orders")?;
        if n != "0" {
            bail!("unexpected row count {n}");
        }

        // A credential with a one-minute lifetime, checked again at the end.
        let short = "apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata: {name: reports, namespace: shop}\nspec:\n  serviceAccountNames: [orders]\n  database:\n    - mount: database\n      connection: shop_reports\n      profile: readonly\n      defaultTTL: 1m\n      maxTTL: 1m\n";
        accepts(&apply(cp, "shop", "reports", short)?, "short-lived binding")?;
        wait_condition(cp, "shop", "reports", "Ready", "True")?;
        let reports_token = bao.login(cp, "shop", "orders", "palisade-shop.reports")?;
        let issued = std::time::Instant::now();
        let (short_user, short_password, _) =
            creds(&bao, &reports_token, "palisade-shop.reports.shop_reports")?;
        pg.psql(&short_user, &short_password, "SELECT 1")?;

        // An annotation change makes the operator reconcile the binding without changing it.
        let touch = |n: &str| {
            run_ok(
                cp.kubectl()
                    .args([
                        "annotate",
                        "--overwrite",
                        "secretbinding",
                        "orders",
                        "-n",
                        "shop",
                    ])
                    .arg(format!("e2e/touch={n}")),
            )
        };

        // A no-op resync writes nothing to Vault.
        let before = vault_totals(&op)?;
        touch("1")?;
        std::thread::sleep(Duration::from_secs(3));
        let after = vault_totals(&op)?;
        if after.1 > before.1 || after.0 <= before.0 {
            bail!("no-op resync: Vault requests {before:?} -> {after:?} (want reads, no writes)");
        }

        // A hand edit in Vault is repaired and reported.
        let widened = bao.dir_file(
            "widened.hcl",
            "path \"secret/data/*\" { capabilities = [\"read\"] }\n",
        )?;
        bao.root(&["policy", "write", &policy, &widened])?;
        touch("2")?;
        cp.eventually("the policy repaired", WAIT, || {
            let text = bao.root(&["policy", "read", &policy]).ok()?;
            (!text.contains("secret/data/*") && text.contains("secret/data/shop/orders/*"))
                .then_some(())
        })?;
        // So is a hand edit of a role field Palisade does not set: a token period (periodic
        // tokens that never reach a maximum lifetime).
        let role_path = format!("auth/kubernetes/role/{role}");
        bao.root(&["write", &role_path, "token_period=720h"])?;
        touch("3")?;
        cp.eventually("the role's token period reset", WAIT, || {
            let period = bao
                .root(&["read", "-field=token_period", &role_path])
                .ok()?;
            (period == "0").then_some(())
        })?;
        cp.eventually("a DriftReverted event", WAIT, || {
            let ev = run_ok(cp.kubectl().args([
                "get",
                "events",
                "-n",
                "shop",
                "--field-selector",
                "involvedObject.name=orders,reason=DriftReverted",
                "-o",
                "name",
            ]))
            .ok()?;
            (!ev.trim().is_empty()).then_some(())
        })?;

        // Vault down: the binding says so, and the update made meanwhile lands once it is back.
        bao.seal()?;
        let mut yaml = std::fs::read_to_string(examples.join("40-secretbinding-orders.yaml"))?;
        yaml = yaml.replace("tokenTTL: 1h", "tokenTTL: 45m");
        accepts(&apply(cp, "shop", "ttl", &yaml)?, "binding update")?;
        let (_, reason, msg) = wait_condition(cp, "shop", "orders", "VaultUnavailable", "True")?;
        eprintln!("  while sealed: VaultUnavailable ({reason}): {msg}");
        bao.unseal()?;
        cp.eventually(
            "the update written after the outage",
            Duration::from_mins(2),
            || {
                let out = bao
                    .root(&[
                        "read",
                        "-field=token_ttl",
                        &format!("auth/kubernetes/role/{role}"),
                    ])
                    .ok()?;
                (out == "2700").then_some(())
            },
        )?;
        wait_condition(cp, "shop", "orders", "Ready", "True")?;

        // Deleting the binding revokes the credential's lease and removes the role.
        run_ok(cp.kubectl().args([
            "delete",
            "secretbinding",
            "orders",
            "-n",
            "shop",
            "--timeout=60s",
        ]))?;
        if pg.psql(&user, &password, "SELECT 1").is_ok() {
            bail!("the database credential still logs in after the binding was deleted");
        }
        let out = bao.root(&[
            "write",
            "-format=json",
            "sys/leases/lookup",
            &format!("lease_id={lease}"),
        ]);
        if out.is_ok() {
            bail!("lease {lease} still exists: {out:?}");
        }
        if bao.login(cp, "shop", "orders", role).is_ok() {
            bail!("login still works after the binding was deleted");
        }
        if bao.root(&["policy", "read", &policy]).is_ok() {
            bail!("policy {role} still exists");
        }

        // The one-minute credential stops working once its lifetime is over.
        cp.eventually(
            "the short-lived credential to expire",
            Duration::from_secs(100),
            || {
                pg.psql(&short_user, &short_password, "SELECT 1")
                    .is_err()
                    .then_some(())
            },
        )?;
        eprintln!(
            "  one-minute credential refused {:.0} s after issue",
            issued.elapsed().as_secs_f64()
        );
        if issued.elapsed() < Duration::from_secs(55) {
            bail!("the credential stopped working before its lifetime was over");
        }
        run_ok(cp.kubectl().args([
            "delete",
            "secretbinding",
            "reports",
            "-n",
            "shop",
            "--timeout=60s",
        ]))?;
        Ok(())
    })();
    result.map_err(|e| anyhow::anyhow!("{e:#}\noperator log:\n{}", op.log_tail()))
}

/// From the attacker's side: bindings reaching outside their namespace's tenancy are refused
/// with a condition that says why, and Vault is not touched; the API server refuses what its
/// schema already rules out. A deleted binding whose Vault is down is released after the
/// cleanup timeout instead of blocking its namespace.
fn tenancy_refusals_write_nothing(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let Rig { pg: _pg, bao, op } = rig(env, "vault-tenancy")?;
    let result = cp.with_temp_ns("vault", |ns| {
        run_ok(cp.kubectl().args(["create", "serviceaccount", "app", "-n", ns]))?;
        let sb = |name: &str, grants: &str| {
            format!("apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata:\n  name: {name}\nspec:\n  serviceAccountNames: [app]\n{grants}")
        };
        for (name, grants, why) in [
            ("other-ns-path", "  kv: [{mount: secret, path: payments/*}]\n", "outside what namespace"),
            ("kv-version", "  kv: [{mount: secret, path: NS/app, version: 1}]\n", "KV version 2"),
            ("other-connection", "  database: [{mount: database, connection: orders-pg, profile: readonly, defaultTTL: 1m, maxTTL: 1h}]\n", "connection not open"),
            // `{namespace}_*` is NS's; NS-eu_pg would be namespace NS-eu's.
            ("neighbour-connection", "  database: [{mount: database, connection: NS-eu_pg, profile: readonly, defaultTTL: 1m, maxTTL: 1h}]\n", "connection not open"),
            ("unlisted-mount", "  kv: [{mount: sys, path: NS/x}]\n", "is not open to namespace"),
        ] {
            let grants = grants.replace("NS", ns);
            accepts(&apply(cp, ns, name, &sb(name, &grants))?, name)?;
            let (_, reason, msg) = wait_condition(cp, ns, name, "Accepted", "False")?;
            if reason != "OutsideTenancy" || !msg.contains(why) {
                bail!("{name}: Accepted=False {reason}: {msg} (want OutsideTenancy, {why:?})");
            }
            let listed = bao.root(&["policy", "list"])?;
            if listed.lines().any(|p| p.starts_with(&format!("palisade-{ns}.{name}."))) {
                bail!("{name}: a policy was written for a refused binding");
            }
        }
        // Refusal takes access away (deletes and revocations); it never creates anything.
        for name in ["other-ns-path", "kv-version", "other-connection", "neighbour-connection", "unlisted-mount"] {
            if bao.root(&["read", &format!("auth/kubernetes/role/palisade-{ns}.{name}")]).is_ok() {
                bail!("{name}: a login role exists for a refused binding");
            }
        }
        // What the schema rules out never reaches the operator.
        for (name, grants, needle) in [
            ("dotdot", "  kv: [{mount: secret, path: NS/../payments/x}]\n", "'..' segments"),
            ("glob", "  kv: [{mount: secret, path: NS*}]\n", "no other wildcards"),
            ("foreign-sa", "  kv: [{mount: secret, path: NS/x}]\n", "serviceAccountNames"),
        ] {
            let mut yaml = sb(name, &grants.replace("NS", ns));
            if name == "foreign-sa" {
                yaml = yaml.replace("[app]", "[\"payments:app\"]");
            }
            rejects(&apply(cp, ns, name, &yaml)?, name, &[needle])?;
        }

        // A granted binding, then Vault goes away and the binding is deleted: released after
        // the cleanup timeout, with a Warning naming what was left.
        let ok = sb("granted", &format!("  kv: [{{mount: secret, path: {ns}/app/*}}]\n"));
        accepts(&apply(cp, ns, "granted", &ok)?, "granted")?;
        wait_condition(cp, ns, "granted", "Ready", "True")?;
        bao.seal()?;
        run_ok(cp.kubectl().args(["delete", "secretbinding", "granted", "-n", ns, "--wait=false"]))?;
        cp.eventually("the binding released despite Vault being down", Duration::from_secs(90), || {
            binding(cp, ns, "granted").is_none().then_some(())
        })?;
        let ev = run_ok(cp.kubectl().args(["get", "events", "-n", ns, "--field-selector", "reason=VaultCleanupAbandoned", "-o", "name"]))?;
        if ev.trim().is_empty() {
            bail!("no VaultCleanupAbandoned event");
        }
        bao.unseal()?;
        Ok(())
    });
    result.map_err(|e| anyhow::anyhow!("{e:#}\noperator log:\n{}", op.log_tail()))
}
