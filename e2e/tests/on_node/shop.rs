//! The example shop as real workloads on the node: its images signed and attested, admitted by
//! the installed webhook under the example ImagePolicy, running the digests that were verified;
//! `orders` uses its SecretBinding from inside its pod, `frontend` cannot.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_e2e::{
    repo_root, run, run_ok,
    shop::{self, NS, SHOP, helm, helm_succeeded},
};
use serde_json::{Value, json};

use crate::{Env, on_node::palisade::installed};

/// The shop, deployed once (the first test to need it does).
pub(crate) fn shop_running(env: &Env) -> Result<&shop::Shop> {
    env.shop
        .get_or_init(|| {
            installed(env)
                .and_then(|inst| shop::deploy_shop(&env.node, inst))
                .map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow::anyhow!("the shop could not be deployed: {e}"))
}

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
    let deployed = shop_running(env)?;
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

/// The last outcome of `orders`' step `name` and its round count.
fn orders_step(env: &Env, name: &str) -> Option<((bool, String, String), u64)> {
    let s = shop::workload_status(&env.node, "orders").ok()?;
    Some((step(&s, name)?, s["rounds"].as_u64().unwrap_or(0)))
}

/// The SecretBinding's condition `type_`: (status, reason).
fn binding_condition(env: &Env, type_: &str) -> Option<(String, String)> {
    let out = run_ok(env.node.cp().kubectl().args([
        "get",
        "secretbinding",
        "orders",
        "-n",
        SHOP,
        "-o",
        &format!("jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}} {{.status.conditions[?(@.type==\"{type_}\")].reason}}"),
    ]))
    .ok()?;
    let (s, r) = out.split_once(' ')?;
    Some((s.to_owned(), r.to_owned()))
}

/// OpenBao sealed while `orders` uses its binding: the workload's logins fail and the binding
/// (reconciled by the installed operator) reports `VaultUnavailable`; after unseal both recover.
/// Then the binding is deleted while OpenBao is sealed: it is released after the cleanup timeout,
/// and once OpenBao answers again the sweep revokes the credential `orders` last received (its
/// PostgreSQL role is dropped) and removes the login role. Prints each time.
pub fn vault_sealed_while_the_shop_uses_its_binding(env: &Env) -> Result<()> {
    let node = &env.node;
    let inst = installed(env)?;
    shop_running(env)?;
    let cp = node.cp();
    let wait = Duration::from_mins(2);
    cp.eventually("orders querying PostgreSQL", wait, || {
        orders_step(env, "postgres").filter(|(p, _)| p.0)
    })?;
    let t = std::time::Instant::now();
    inst.bao.seal()?;
    cp.eventually("orders' login refused while sealed", wait, || {
        orders_step(env, "login").filter(|(l, _)| !l.0 && l.2.contains("sealed"))
    })?;
    let noticed = t.elapsed();
    // A change to the binding meanwhile: the operator cannot write it and says why.
    run_ok(cp.kubectl().args([
        "annotate",
        "--overwrite",
        "secretbinding",
        "orders",
        "-n",
        SHOP,
        "e2e/touch=sealed",
    ]))?;
    cp.eventually("the binding reporting VaultUnavailable", wait, || {
        binding_condition(env, "VaultUnavailable").filter(|c| c.0 == "True")
    })?;
    let reported = t.elapsed();
    let t = std::time::Instant::now();
    inst.bao.unseal()?;
    cp.eventually("the binding Ready after unseal", wait, || {
        binding_condition(env, "Ready").filter(|c| c.0 == "True")
    })?;
    let ((_, user, _), _) = cp.eventually("orders querying PostgreSQL again", wait, || {
        let (p, r) = orders_step(env, "postgres").filter(|(p, _)| p.0)?;
        let c = orders_step(env, "database-credential")?;
        (p.2.is_empty()).then_some((c.0, r))
    })?;
    eprintln!(
        "  sealed: orders' login refused after {:.1} s, the binding VaultUnavailable after {:.1} s; unsealed: binding Ready and orders querying again after {:.1} s",
        noticed.as_secs_f64(),
        reported.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    deleted_while_sealed(env, inst, &user)?;
    run_ok(
        cp.kubectl()
            .arg("apply")
            .arg("-f")
            .arg(palisade_e2e::repo_root().join("examples/40-secretbinding-orders.yaml")),
    )?;
    Ok(())
}

/// The binding deleted while OpenBao is sealed: released after the cleanup timeout with the
/// credential `user` still in PostgreSQL; once OpenBao answers, the sweep revokes it and removes
/// the login role.
fn deleted_while_sealed(env: &Env, inst: &shop::Installation, user: &str) -> Result<()> {
    let cp = env.node.cp();
    let wait = Duration::from_mins(2);
    // Deleted while sealed: released after the cleanup timeout; revoked once OpenBao is back.
    inst.bao.seal()?;
    let t = std::time::Instant::now();
    run_ok(cp.kubectl().args([
        "delete",
        "secretbinding",
        "orders",
        "-n",
        SHOP,
        "--wait=false",
    ]))?;
    cp.eventually("the binding released while OpenBao is sealed", wait, || {
        let out =
            palisade_e2e::run(
                cp.kubectl()
                    .args(["get", "secretbinding", "orders", "-n", SHOP]),
            )
            .ok()?;
        (!out.status.success()).then_some(())
    })?;
    let released = t.elapsed();
    let role_exists = |who: &str| {
        inst.pg
            .psql(
                palisade_e2e::postgres::SUPERUSER,
                &inst.pg.password,
                &format!("SELECT count(*) FROM pg_roles WHERE rolname = '{who}'"),
            )
            .map(|n| n == "1")
    };
    if !role_exists(user)? {
        bail!("credential {user} gone while OpenBao was sealed: expected it to wait for the sweep");
    }
    let t = std::time::Instant::now();
    inst.bao.unseal()?;
    cp.eventually("the credential's role dropped by the sweep", wait, || {
        (!role_exists(user).ok()?).then_some(())
    })?;
    let revoked = t.elapsed();
    let login_role = inst
        .bao
        .root(&["read", "auth/kubernetes/role/palisade-shop.orders"]);
    if login_role.is_ok() {
        bail!("the login role outlived the binding's deletion and the sweep");
    }
    cp.eventually("orders' login refused after the sweep", wait, || {
        orders_step(env, "login").filter(|(l, _)| !l.0)
    })?;
    eprintln!(
        "  deleted while sealed: released after {:.1} s; after unseal the sweep dropped credential {user} in {:.1} s, login role gone",
        released.as_secs_f64(),
        revoked.as_secs_f64()
    );
    Ok(())
}

/// `identitySource: Spire` on the node: the real SPIRE server, an agent on the node with the
/// Kubernetes workload attestor (it asks this node's kubelet which pod calls), and the SPIRE
/// controller manager. The ClusterSPIFFEID Palisade writes for the `orders` AuthPolicy becomes a
/// registration entry, and the `orders` pod, asking the Workload API through the socket it
/// mounts, receives exactly `spiffe://cluster.local/ns/shop/sa/orders`: the identity the
/// `payments` AuthPolicy names. A pod under the same ServiceAccount that no AuthPolicy selects
/// gets no entry, and the webhook refuses it for having no SPIFFE identity. Runs last: it moves
/// the installation to SPIRE.
pub fn orders_receives_its_svid_from_spire(env: &Env) -> Result<()> {
    const TRUST_DOMAIN: &str = "cluster.local";
    let node = &env.node;
    shop_running(env)?;
    let cp = node.cp();
    let bin_dir = node
        .bin("spire-agent")
        .parent()
        .map(std::path::Path::to_path_buf)
        .context("the tools' directory")?;
    let t = Instant::now();
    let spire = palisade_e2e::spire::OnNode::start(&bin_dir, node, TRUST_DOMAIN)?;
    let started = t.elapsed();
    let out = run(helm(node)
        .args(["upgrade", "palisade"])
        .arg(repo_root().join("charts/palisade"))
        .args(["--namespace", NS, "--reuse-values"])
        .args(["--set", "identitySource=Spire", "--wait", "--timeout", "4m"]))?;
    helm_succeeded(node, "upgrade to identitySource Spire", &out)?;
    // Until the old webhook pods are gone, some requests still meet the old identity source.
    crate::on_node::palisade::old_webhook_pods_gone(node)?;
    // The operator writes the ClusterSPIFFEID; the controller manager makes it an entry.
    let want = format!("spiffe://{TRUST_DOMAIN}/ns/{SHOP}/sa/orders");
    let entries = cp
        .eventually("a SPIRE entry for orders", Duration::from_mins(2), || {
            spire.entries().ok().filter(|e| e.contains(&want))
        })
        .with_context(|| format!("controller manager: {}", spire.log_tail("manager")))?;
    let frontend = format!("spiffe://{TRUST_DOMAIN}/ns/{SHOP}/sa/frontend");
    if entries.contains(&frontend) {
        bail!("an entry for {frontend}, which no AuthPolicy selects:\n{entries}");
    }
    let t = Instant::now();
    mount_agent_socket(node, &spire.sockets)?;
    let identity = cp
        .eventually("orders' SVID", Duration::from_mins(1), || {
            let body = shop::workload_get(node, "orders", "/identity").ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["spiffeID"].as_str().map(str::to_owned)
        })
        .with_context(|| format!("node agent: {}", spire.log_tail("node-agent")))?;
    if identity != want {
        bail!("orders received {identity}, not {want}");
    }
    named_by_its_caller(node, &want)?;
    eprintln!(
        "  SPIRE (server, node agent, controller manager) up in {:.1} s; orders received {identity} {:.1} s after its patch, the principal payments' policy admits",
        started.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    impostor_refused(node)?;
    eprintln!(
        "  a pod no AuthPolicy selects (ServiceAccount orders): no entry, refused by the webhook"
    );
    Ok(())
}

/// Patches `orders` to mount the node agent's socket directory and tell the workload where its
/// Workload API is, and waits for the rollout.
fn mount_agent_socket(node: &palisade_e2e::node::Node, sockets: &std::path::Path) -> Result<()> {
    let dir = palisade_e2e::spire::POD_SOCKET_DIR;
    let patch = json!({"spec": {"template": {"spec": {
        "volumes": [{"name": "spire-agent", "hostPath": {"path": sockets, "type": "Directory"}}],
        "containers": [{
            "name": "orders",
            "env": [{"name": "SPIFFE_ENDPOINT_SOCKET", "value": format!("unix://{dir}/agent.sock")}],
            "volumeMounts": [{"name": "spire-agent", "mountPath": dir, "readOnly": true}],
        }],
    }}}});
    let kubectl = || node.cp().kubectl();
    run_ok(
        kubectl()
            .args(["patch", "deployment", "orders", "-n", SHOP])
            .args(["-p", &patch.to_string()]),
    )?;
    run_ok(kubectl().args([
        "rollout",
        "status",
        "deployment/orders",
        "-n",
        SHOP,
        "--timeout=120s",
    ]))?;
    Ok(())
}

/// `want` is the identity the `payments` AuthPolicy names, and a principal its generated
/// AuthorizationPolicy admits.
fn named_by_its_caller(node: &palisade_e2e::node::Node, want: &str) -> Result<()> {
    let kubectl = || node.cp().kubectl();
    let named = run_ok(
        kubectl()
            .args(["get", "authpolicy", "payments", "-n", SHOP])
            .args(["-o", "jsonpath={.spec.rules[0].from[0].spiffeId}"]),
    )?;
    let principals = run_ok(
        kubectl()
            .args(["get", "authorizationpolicies.security.istio.io", "-n", SHOP])
            .args([
                "-o",
                "jsonpath={range .items[*]}{.spec.rules[*].from[*].source.principals}{end}",
            ]),
    )?;
    let principal = want.trim_start_matches("spiffe://");
    if named.trim() != want || !principals.contains(&format!("\"{principal}\"")) {
        bail!(
            "the payments policy names {named:?} and the generated policies admit {principals}, not {want}"
        );
    }
    Ok(())
}

/// An impostor: the `orders` ServiceAccount and image, labels no AuthPolicy selects. No
/// ClusterSPIFFEID selects it, so it would get no SVID; the webhook refuses it for that.
fn impostor_refused(node: &palisade_e2e::node::Node) -> Result<()> {
    let image = run_ok(
        node.cp()
            .kubectl()
            .args(["get", "deployment", "orders", "-n", SHOP])
            .args(["-o", "jsonpath={.spec.template.spec.containers[0].image}"]),
    )?;
    let out = crate::on_node::palisade::dry_run(
        node,
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: impostor, namespace: {SHOP}, labels: {{app: impostor}}}}
spec:
  serviceAccountName: orders
  containers:
    - name: app
      image: {image}
"
        ),
    )?;
    let why = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !why.contains("ClusterSPIFFEID") {
        bail!(
            "a pod no ClusterSPIFFEID selects was not refused for its identity: {}{why}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Cluster DNS on the node: CoreDNS (built here, a pod in `kube-system` behind Service
/// `kube-dns`) answers the shop's pods through the resolver the kubelet gives them: a Service's
/// short name (the namespace's search domain), its full name and another namespace's Service
/// resolve to their ClusterIPs; a name that does not exist does not resolve.
pub fn cluster_dns_resolves_services(env: &Env) -> Result<()> {
    let node = &env.node;
    shop_running(env)?;
    let cp = node.cp();
    let cluster_ip = |ns: &str, svc: &str| {
        run_ok(cp.kubectl().args([
            "get",
            "service",
            svc,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]))
    };
    let resolve = |name: &str| -> Result<Value> {
        let body = shop::workload_get(node, "frontend", &format!("/resolve?name={name}"))?;
        serde_json::from_str(&body).with_context(|| body.clone())
    };
    for (name, ns, svc) in [
        ("orders", SHOP, "orders"),
        ("payments.shop.svc.cluster.local", SHOP, "payments"),
        ("kubernetes.default", "default", "kubernetes"),
    ] {
        let want = cluster_ip(ns, svc)?;
        let got = resolve(name)?;
        let addresses = got["addresses"].as_array().cloned().unwrap_or_default();
        if addresses != [Value::from(want.trim())] {
            bail!("{name} resolved to {got}, not {want}");
        }
        eprintln!("  {name} -> {}", want.trim());
    }
    let missing = resolve("missing.shop.svc.cluster.local")?;
    if missing["addresses"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
        || !missing["error"]
            .as_str()
            .is_some_and(|e| e.contains("no such host"))
    {
        bail!("a name that does not exist resolved: {missing}");
    }
    Ok(())
}
