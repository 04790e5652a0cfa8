//! SecretBinding tenancy from the attacker's side, against the real OpenBao and PostgreSQL:
//! what a namespace owner (or whoever holds the operator's Vault identity) tries, and what
//! they do not get.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use palisade_e2e::{
    ControlPlane, accepts,
    openbao::{EXAMPLE_TENANCY, OPERATOR_ROLE},
    operator::OperatorProcess,
    rejects, run, run_ok,
};

use super::{Rig, apply, binding, creds, rig, wait_condition};
use crate::Env;

fn sb(name: &str, grants: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1alpha1\nkind: SecretBinding\nmetadata:\n  name: {name}\nspec:\n  serviceAccountNames: [app]\n{grants}"
    )
}

fn denied(out: &std::process::Output, what: &str) -> Result<()> {
    if out.status.success() {
        bail!(
            "{what}: allowed ({})",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.contains("permission denied") && !err.contains("403") {
        bail!("{what}: failed, but not as refused: {}", err.trim());
    }
    Ok(())
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    run_ok(cp.kubectl().args(args))
}

/// Class by class: SQL from the tenant, connections of a neighbour, access that outlives its
/// binding, the operator's identity widened, objects of another owner, status used as input,
/// the `default` policy.
#[allow(clippy::too_many_lines)]
pub fn tenant_and_operator_attacks_get_nothing(env: &Env) -> Result<()> {
    let cp = &env.cp;
    let Rig { pg, bao, op } = rig(env, "vault-attacks")?;
    let op = std::cell::RefCell::new(Some(op));
    let result = cp.with_temp_ns("vault", |ns| {
        for sa in ["app", "other"] {
            kubectl(cp, &["create", "serviceaccount", sa, "-n", ns])?;
        }
        let conn = format!("{ns}_pg");
        bao.add_connection(&pg, &conn, ns)?;
        let db = |profile: &str| {
            format!("  database: [{{mount: database, connection: {conn}, profile: {profile}, defaultTTL: 1h, maxTTL: 2h}}]\n")
        };

        // 1. SQL is the platform's: the schema has no field for it...
        let sql = format!("  database: [{{mount: database, connection: {conn}, creationStatements: [\"CREATE ROLE \\\"{{{{name}}}}\\\" SUPERUSER LOGIN PASSWORD '{{{{password}}}}'\"], defaultTTL: 1h, maxTTL: 2h}}]\n");
        rejects(&apply(cp, ns, "sql", &sb("sql", &sql))?, "tenant SQL", &["creationStatements"])?;
        // ...a profile the connection does not offer is refused...
        accepts(&apply(cp, ns, "rw", &sb("rw", &db("readwrite")))?, "rw")?;
        let (_, reason, _) = wait_condition(cp, ns, "rw", "Accepted", "False")?;
        if reason != "ProfileNotAllowed" {
            bail!("profile not offered: reason {reason}");
        }
        // ...and the credential of an offered one can do what the profile says, nothing more.
        accepts(&apply(cp, ns, "db", &sb("db", &db("readonly")))?, "db")?;
        wait_condition(cp, ns, "db", "Ready", "True")?;
        let token = bao.login(cp, ns, "app", &format!("palisade-{ns}.db"))?;
        let (user, password, _) = creds(&bao, &token, &format!("palisade-{ns}.db.{conn}"))?;
        pg.psql(&user, &password, "SELECT count(*) FROM orders")?;
        let catalogue = pg.psql(
            "postgres",
            &pg.password,
            &format!("SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR pg_has_role('{user}', 'pg_execute_server_program', 'MEMBER') FROM pg_roles WHERE rolname = '{user}'"),
        )?;
        if catalogue != "f" {
            bail!("the credential {user} holds a privilege (catalogue says {catalogue:?})");
        }
        for sql in ["SELECT count(*) FROM payroll", "INSERT INTO orders VALUES (1)", "COPY (SELECT 1) TO PROGRAM 'true'", "CREATE ROLE intruder"] {
            if pg.psql(&user, &password, sql).is_ok() {
                bail!("the readonly credential ran {sql:?}");
            }
        }
        // The `default` policy is not attached to workload tokens.
        let policies = bao.root(&["token", "lookup", "-format=json", &token])?;
        if policies.contains("\"default\"") {
            bail!("the workload token carries the default policy: {policies}");
        }

        // 2. The operator's own identity cannot widen what a credential or a login may do.
        let op_token = bao.login(cp, "palisade-system", "palisade-operator", OPERATOR_ROLE)?;
        let role = format!("auth/kubernetes/role/palisade-{ns}.evil");
        for (what, args) in [
            ("superuser SQL", vec![format!("database/roles/palisade-{ns}.evil.{conn}"), format!("db_name={conn}"), "creation_statements=CREATE ROLE \"{{name}}\" SUPERUSER LOGIN PASSWORD '{{password}}'".into()]),
            ("the default policy", vec![role.clone(), "bound_service_account_names=app".into(), format!("bound_service_account_namespaces={ns}"), "token_policies=default".into()]),
            ("a foreign policy in a list", vec![role.clone(), "bound_service_account_names=app".into(), format!("bound_service_account_namespaces={ns}"), format!("token_policies=palisade-{ns}.db,{OPERATOR_ROLE}")]),
            ("a ServiceAccount glob", vec![role.clone(), "bound_service_account_names=*".into(), format!("bound_service_account_namespaces={ns}"), format!("token_policies=palisade-{ns}.db")]),
            ("the operator's namespace", vec![role.clone(), "bound_service_account_names=palisade-operator".into(), "bound_service_account_namespaces=palisade-system".into(), format!("token_policies=palisade-{ns}.db")]),
            ("the operator's namespace with a trailing space", vec![role.clone(), "bound_service_account_names=palisade-operator".into(), "bound_service_account_namespaces=palisade-system ".into(), format!("token_policies=palisade-{ns}.db")]),
            ("a token period", vec![role.clone(), "bound_service_account_names=app".into(), format!("bound_service_account_namespaces={ns}"), format!("token_policies=palisade-{ns}.db"), "token_period=720h".into()]),
        ] {
            let mut a = vec!["write".to_owned()];
            a.extend(args);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            denied(&bao.bao_output(&op_token, &a)?, &format!("operator identity writing {what}"))?;
        }
        // A connection serves only its namespace's role names, even to a Vault admin's role.
        bao.root(&["write", &format!("database/roles/palisade-intruder.x.{conn}"), &format!("db_name={conn}"), "creation_statements=CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}'"])?;
        if bao.root(&["read", &format!("database/creds/palisade-intruder.x.{conn}")]).is_ok() {
            bail!("connection {conn} issued a credential for another namespace's role name");
        }

        // 3. Access is taken away: when the binding becomes refused...
        let kv = |path: &str| format!("  kv: [{{mount: secret, path: {path}}}]\n");
        bao.root(&["kv", "put", &format!("secret/{ns}/app/key"), "v=1"])?;
        accepts(&apply(cp, ns, "kv", &sb("kv", &kv(&format!("{ns}/app/*"))))?, "kv")?;
        wait_condition(cp, ns, "kv", "Ready", "True")?;
        let kv_token = bao.login(cp, ns, "app", &format!("palisade-{ns}.kv"))?;
        bao.bao(&kv_token, &["kv", "get", &format!("secret/{ns}/app/key")])?;
        accepts(&apply(cp, ns, "kv2", &sb("kv", &kv("payments/*")))?, "kv edited outside")?;
        wait_condition(cp, ns, "kv", "Accepted", "False")?;
        cp.eventually("the refused binding's access removed", Duration::from_secs(30), || {
            bao.bao(&kv_token, &["kv", "get", &format!("secret/{ns}/app/key")]).is_err().then_some(())
        })?;
        if bao.login(cp, ns, "app", &format!("palisade-{ns}.kv")).is_ok() {
            bail!("a refused binding still logs in");
        }
        cp.eventually("an AccessRemoved event", Duration::from_secs(30), || {
            let ev = kubectl(cp, &["get", "events", "-n", ns, "--field-selector", "involvedObject.name=kv,reason=AccessRemoved", "-o", "name"]).ok()?;
            (!ev.trim().is_empty()).then_some(())
        })?;
        // ...when its finalizer is removed by hand before deletion (the sweep finds it)...
        accepts(&apply(cp, ns, "gone", &sb("gone", &kv(&format!("{ns}/app/*"))))?, "gone")?;
        wait_condition(cp, ns, "gone", "Ready", "True")?;
        let gone_token = bao.login(cp, ns, "app", &format!("palisade-{ns}.gone"))?;
        let gone_policy = binding(cp, ns, "gone")
            .and_then(|b| b["status"]["vaultPolicy"].as_str().map(str::to_owned))
            .unwrap_or_default();
        // With the operator away, so the finalizer cannot be put back or run.
        if let Some(running) = op.borrow_mut().take() {
            running.terminate()?;
        }
        kubectl(cp, &["patch", "secretbinding", "gone", "-n", ns, "--type=merge", "-p", "{\"metadata\":{\"finalizers\":null}}"])?;
        kubectl(cp, &["delete", "secretbinding", "gone", "-n", ns, "--wait=true"])?;
        let deleted = Instant::now();
        *op.borrow_mut() = Some(OperatorProcess::start(cp, "vault-attacks-2", &bao.operator_config(&format!("{EXAMPLE_TENANCY}  sweepIntervalSeconds: 10\n")))?);
        if bao.root(&["policy", "read", &gone_policy]).is_err() {
            bail!("the policy was removed before the sweep could run");
        }
        cp.eventually("the sweep to remove an unfinalized binding's access", Duration::from_mins(1), || {
            bao.root(&["policy", "read", &gone_policy]).is_err().then_some(())
        })?;
        eprintln!("  unfinalized binding's access removed {:.0} s after deletion", deleted.elapsed().as_secs_f64());
        if bao.root(&["token", "lookup", &gone_token]).is_ok() || bao.login(cp, ns, "app", &format!("palisade-{ns}.gone")).is_ok() {
            bail!("the swept binding's token or login still works");
        }
        // ...and on deletion even when the tenant asks to Retain.
        let retain = format!("  deletionPolicy: Retain\n{}", db("readonly"));
        accepts(&apply(cp, ns, "keep", &sb("keep", &retain))?, "keep")?;
        let (_, _, msg) = wait_condition(cp, ns, "keep", "Accepted", "True")?;
        if !msg.contains("Retain is not allowed") {
            bail!("Accepted does not say Retain is refused: {msg}");
        }
        wait_condition(cp, ns, "keep", "Ready", "True")?;
        let keep_token = bao.login(cp, ns, "app", &format!("palisade-{ns}.keep"))?;
        // Vault finds roles in any case and records the name as sent: this token is revoked too.
        let upper_token = bao.login(cp, ns, "app", &format!("palisade-{ns}.keep").to_ascii_uppercase())?;
        let (keep_user, keep_password, _) = creds(&bao, &keep_token, &format!("palisade-{ns}.keep.{conn}"))?;
        kubectl(cp, &["delete", "secretbinding", "keep", "-n", ns, "--timeout=60s"])?;
        if pg.psql(&keep_user, &keep_password, "SELECT 1").is_ok() {
            bail!("a Retain binding's credential works after deletion");
        }
        if bao.root(&["token", "lookup", &keep_token]).is_ok() {
            bail!("a deleted binding's Vault token was not revoked");
        }
        if bao.root(&["token", "lookup", &upper_token]).is_ok() {
            bail!("a token logged in with the role name in upper case was not revoked");
        }

        // 3b. Vault's certificate is checked against the configured CA only: an operator
        // given another CA talks to nobody (and no environment variable changes that).
        if let Some(running) = op.borrow_mut().take() {
            running.terminate()?;
        }
        let wrong_ca = bao
            .operator_config(&format!("{EXAMPLE_TENANCY}  sweepIntervalSeconds: 10\n"))
            .replace(&bao.ca.display().to_string(), &cp.pki.ca_cert.display().to_string());
        let wrong = OperatorProcess::start(cp, "vault-attacks-ca", &wrong_ca)?;
        accepts(&apply(cp, ns, "tls", &sb("tls", &kv(&format!("{ns}/app/*"))))?, "tls")?;
        let (_, reason, msg) = wait_condition(cp, ns, "tls", "VaultUnavailable", "True")?;
        if !msg.to_ascii_lowercase().contains("certificate") && !msg.contains("UnknownIssuer") {
            bail!("an operator trusting another CA reached Vault, or said so unclearly: {reason}: {msg}");
        }
        wrong.terminate()?;
        *op.borrow_mut() = Some(OperatorProcess::start(cp, "vault-attacks-3", &bao.operator_config(&format!("{EXAMPLE_TENANCY}  sweepIntervalSeconds: 10\n")))?);
        wait_condition(cp, ns, "tls", "Ready", "True")?;

        // 4. A login role of the same name that Palisade did not write is neither used, changed
        // nor deleted (also when the binding is then deleted).
        let handmade = format!("auth/kubernetes/role/palisade-{ns}.handmade");
        bao.root(&["write", &handmade, "bound_service_account_names=other", &format!("bound_service_account_namespaces={ns}"), "token_policies=platform-reports"])?;
        let before = bao.root(&["read", "-format=json", &handmade])?;
        accepts(&apply(cp, ns, "handmade", &sb("handmade", &kv(&format!("{ns}/app/*"))))?, "handmade")?;
        let (_, reason, msg) = wait_condition(cp, ns, "handmade", "Ready", "False")?;
        if reason != "NotOwned" {
            bail!("a foreign login role of the same name: Ready=False {reason}: {msg}");
        }
        kubectl(cp, &["delete", "secretbinding", "handmade", "-n", ns, "--wait=false"])?;
        std::thread::sleep(Duration::from_secs(3));
        let after = bao.root(&["read", "-format=json", &handmade])?;
        let fields = |t: &str| serde_json::from_str::<serde_json::Value>(t).map(|v| v["data"].clone()).unwrap_or_default();
        if fields(&before) != fields(&after) {
            bail!("the hand-made login role was changed: {after}");
        }

        // 5. Status is not input: naming another binding's database role there and deleting
        // the binding leaves the other's credential working.
        accepts(&apply(cp, ns, "victim", &sb("victim", &db("readonly")))?, "victim")?;
        wait_condition(cp, ns, "victim", "Ready", "True")?;
        let victim_token = bao.login(cp, ns, "app", &format!("palisade-{ns}.victim"))?;
        let (v_user, v_password, _) = creds(&bao, &victim_token, &format!("palisade-{ns}.victim.{conn}"))?;
        accepts(&apply(cp, ns, "liar", &sb("liar", &kv(&format!("{ns}/app/*"))))?, "liar")?;
        wait_condition(cp, ns, "liar", "Ready", "True")?;
        let patch = format!("{{\"status\":{{\"databaseRoles\":[\"database/roles/palisade-{ns}.victim.{conn}\"]}}}}");
        kubectl(cp, &["patch", "secretbinding", "liar", "-n", ns, "--subresource=status", "--type=merge", "-p", &patch])?;
        kubectl(cp, &["delete", "secretbinding", "liar", "-n", ns, "--timeout=60s"])?;
        pg.psql(&v_user, &v_password, "SELECT 1")
            .map_err(|e| anyhow::anyhow!("deleting a binding whose status named another's role revoked that credential: {e}"))?;
        if binding(cp, ns, "victim").is_none() || bao.root(&["read", &format!("database/roles/palisade-{ns}.victim.{conn}")]).is_err() {
            bail!("the victim's database role is gone");
        }
        for name in ["db", "rw", "kv", "victim", "tls"] {
            let _ = run(cp.kubectl().args(["delete", "secretbinding", name, "-n", ns, "--timeout=60s"]));
        }
        Ok(())
    });
    let tail = op
        .borrow()
        .as_ref()
        .map(OperatorProcess::log_tail)
        .unwrap_or_default();
    result.map_err(|e| anyhow::anyhow!("{e:#}\noperator log:\n{tail}"))
}
