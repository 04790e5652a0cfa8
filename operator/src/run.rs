//! Wiring: discovery, caches, the two controllers, leader election, metrics, shutdown.

use std::sync::{Arc, atomic::Ordering};

use futures::{StreamExt, TryStreamExt, future::FutureExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt,
    core::PartialObjectMeta,
    runtime::{Controller, WatchStreamExt, controller::Action, reflector, watcher},
};
use palisade_api::{AuthPolicy, RateLimitPolicy, SecretBinding};
use palisade_lease::Leadership;

use crate::{
    config::Config,
    controller::{self, Error, State, auth, ratelimit, secrets},
    metrics::{self, Metrics},
    translate::{self, OWNER_NAME_LABEL, OWNER_NAMESPACE_LABEL},
};

fn error_policy<K, S>(_obj: Arc<K>, err: &Error, _state: Arc<S>) -> Action {
    tracing::warn!(error = %err, reason = err.reason(), "reconcile failed; retrying");
    Action::requeue(std::time::Duration::from_secs(5))
}

/// Policies to reconcile when another changes: given the cache and the changed (or deleted)
/// policy, the others whose outcome may depend on it.
type RelatedFn<K> =
    dyn Fn(&reflector::Store<K>, &K, &str) -> Vec<reflector::ObjectRef<K>> + Send + Sync;
/// [`RelatedFn`], shared with the watch that calls it.
type Related<K> = Arc<RelatedFn<K>>;

/// A controller whose cache of `K` drops managed fields (never read, often the largest part).
///
/// A (re-)list fills the cache only when it completes (its objects are swapped in at once), and
/// the controller drops a request for an object its cache does not hold. So the objects of a
/// list do not trigger reconciles one by one, which would be dropped for every object new since
/// the previous list (created while a watch had expired, say); the completed list reconciles
/// every object instead. Changes seen by the watch trigger as usual, except the echoes of the
/// operator's own writes (`echoes`).
///
/// `observe` sees each event before the cache takes it in.
///
/// With `related`, a change to a policy's spec (a new generation, a creation, a deletion) also
/// reconciles the policies `related` names, for the policy as it was and as it is. They are
/// found on the same watch, before the cache takes the change in, and queued so that they
/// reconcile with the cache that holds it: a second watch of the same kind could wake them
/// before this cache has seen the change, and they would keep the old outcome.
fn controller_for<K>(
    client: &Client,
    echoes: &Arc<controller::apply::Echoes>,
    related: Option<(Related<K>, String)>,
    observe: impl Fn(&watcher::Event<K>) + Send + Sync + 'static,
) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let (listed_tx, listed_rx) = futures::channel::mpsc::unbounded();
    let (related_tx, related_rx) = futures::channel::mpsc::unbounded();
    let echoes = Arc::clone(echoes);
    let cache = reader.clone();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(|o| o.meta_mut().managed_fields = None)
        .inspect_ok(move |e| {
            observe(e);
            let Some((related, root)) = &related else {
                return;
            };
            for r in spec_changes(&cache, e, &**related, root) {
                let _ = related_tx.unbounded_send(r);
            }
        })
        .reflect(writer)
        .filter_map(move |e| {
            std::future::ready(match e {
                Ok(watcher::Event::Apply(o)) if echoes.is_echo(o.meta()) => None,
                Ok(watcher::Event::Apply(o)) => Some(Ok(o)),
                Ok(watcher::Event::InitDone) => {
                    let _ = listed_tx.unbounded_send(());
                    None
                }
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
        });
    Controller::for_stream(stream, reader)
        .reconcile_all_on(listed_rx)
        .reconcile_on(related_rx)
}

/// The AuthPolicies a change to one concerns, from the overlap index. The index takes each event
/// in before `related` runs for it, so it answers for the other policies as the cache holds
/// them (the changed policy itself is left out).
fn overlapping_policies(overlaps: &Arc<auth::Overlaps>) -> Related<AuthPolicy> {
    let index = Arc::clone(overlaps);
    Arc::new(move |_, p, root| auth::overlapping(&index, p, root))
}

/// The policies `related` names for a watch event that changes a spec: for an applied object
/// whose generation differs from the cached one (or that is new), those related to it as it is
/// and as it was; for a deleted one, those related to it. Status and metadata-only changes
/// relate to nothing.
fn spec_changes<K>(
    cache: &reflector::Store<K>,
    event: &watcher::Event<K>,
    related: &RelatedFn<K>,
    root: &str,
) -> Vec<reflector::ObjectRef<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    match event {
        watcher::Event::Apply(o) => {
            let before = cache.get(&reflector::ObjectRef::from_obj(o));
            match before {
                Some(b) if b.meta().generation == o.meta().generation => Vec::new(),
                Some(b) => {
                    let mut refs = related(cache, o, root);
                    refs.extend(related(cache, &b, root));
                    refs.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
                    refs.dedup();
                    refs
                }
                None => related(cache, o, root),
            }
        }
        watcher::Event::Delete(o) => related(cache, o, root),
        watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => {
            Vec::new()
        }
    }
}

/// The SecretBinding controller, with a Vault client when the configuration has one.
fn secret_binding_controller(
    client: &Client,
    config: &Config,
    ctl_config: kube::runtime::controller::Config,
    state: &Arc<State>,
    metrics: &Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static,
) -> impl Future<Output = ()> {
    // Vault's HTTP client (reqwest over rustls) uses the process-wide crypto provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let vault = config.vault.clone().and_then(|v| {
        match crate::vault::Vault::new(v, client.clone(), Arc::clone(metrics)) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::error!(error = %e, "Vault client cannot be set up; SecretBindings report VaultNotConfigured");
                None
            }
        }
    });
    let sb_state = Arc::new(secrets::SecretState::new(Arc::clone(state), vault.clone()));
    let ctl = controller_for::<SecretBinding>(client, &state.echoes, None, |_| ());
    tokio::spawn(Metrics::count_ready_every(
        Arc::clone(metrics),
        "SecretBinding",
        ctl.store(),
    ));
    tokio::spawn(secrets::sweeper(Arc::clone(&sb_state)));
    ctl.with_config(ctl_config)
        .graceful_shutdown_on(shutdown)
        .run(secrets::reconcile, error_policy, sb_state)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "SecretBinding controller");
            }
        })
        // The drained controller's Vault token is revoked, not left to expire.
        .then(move |()| async move {
            if let Some(v) = vault {
                v.logout().await;
            }
        })
}

/// Keeps the webhook certificate current, when configured to.
fn certificate_keeper(
    client: &Client,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> futures::future::BoxFuture<'static, ()> {
    match config.webhook_certificate.clone() {
        Some(settings) => crate::certs::run(client.clone(), settings, shutdown).boxed(),
        None => std::future::ready(()).boxed(),
    }
}

/// Runs `work` while holding `leadership`, when there is one: a lost lease ends it with an error;
/// `work` finishing (a graceful shutdown, every reconcile done) hands the lease to a standby.
async fn while_leading(
    leadership: Option<Leadership>,
    work: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Some(leadership) = leadership else {
        work.await;
        return Ok(());
    };
    tokio::select! {
        () = work => {}
        e = leadership.keep() => anyhow::bail!("leadership lost: {e}"),
    }
    if let Err(e) = leadership.release().await {
        tracing::warn!(error = %e, "could not release the lease; a standby takes over when it runs out");
    }
    Ok(())
}

/// The AuthPolicy controller, with the cache of every AuthPolicy in its state (a policy is also
/// reconciled when another that may apply to the same workloads changes: see
/// [`controller_for`]), and the caches of namespaces and ambient pods.
fn with_caches(
    ctl: Controller<AuthPolicy>,
    client: &Client,
    state: &Arc<State>,
    overlaps: Arc<auth::Overlaps>,
) -> (Controller<AuthPolicy>, Arc<auth::AuthState>) {
    let store = ctl.store();
    tokio::spawn(Metrics::count_ready_every(
        Arc::clone(&state.metrics),
        "AuthPolicy",
        store.clone(),
    ));
    // Namespaces and the pods labelled for Istio's ambient mesh (metadata only, the pods filtered
    // by the API server): ztunnel enforces policies there, without their HTTP-level parts. Each
    // change reconciles the policies of its namespace, each completed (re-)list all of them.
    // (Within the running operator: the tasks below end with the process.)
    let (namespaces, ns_writer) = reflector::store();
    let (by_ns, root_ns) = (store.clone(), state.ctx.mesh_root_namespace.clone());
    let ns_triggers = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(ns_writer)
    .filter_map(|e| std::future::ready(logged("namespaces", e)))
    .flat_map(move |e| {
        futures::stream::iter(auth::ambient_triggers(
            &by_ns,
            &e,
            |n: &PartialObjectMeta<Namespace>| n.metadata.name.as_deref(),
            &root_ns,
        ))
    });
    let (ambient_pods, pod_writer) = reflector::store();
    let (by_pod, root_pod) = (store.clone(), state.ctx.mesh_root_namespace.clone());
    let pod_triggers = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default().labels(&format!("{}=ambient", translate::auth::DATAPLANE_MODE)),
    )
    .default_backoff()
    .reflect(pod_writer)
    .filter_map(|e| std::future::ready(logged("ambient pods", e)))
    .flat_map(move |e| {
        futures::stream::iter(auth::ambient_triggers(
            &by_pod,
            &e,
            |p: &PartialObjectMeta<Pod>| p.metadata.namespace.as_deref(),
            &root_pod,
        ))
    });
    // The two caches are filled by their own tasks, not by the controller polling its triggers:
    // a controller busy with as many reconciles as it runs at once polls no trigger, and its
    // reconciles wait for these caches.
    let (tx, rx) = futures::channel::mpsc::unbounded();
    for triggers in [ns_triggers.boxed(), pod_triggers.boxed()] {
        let tx = tx.clone();
        tokio::spawn(triggers.for_each(move |r| {
            let _ = tx.unbounded_send(r);
            std::future::ready(())
        }));
    }
    let ctl = ctl.reconcile_on(rx);
    let state = Arc::new(auth::AuthState {
        shared: Arc::clone(state),
        policies: store,
        overlaps,
        namespaces,
        ambient_pods,
    });
    (ctl, state)
}

/// The event, or a warning with the watch's error (a watch that cannot list, for want of RBAC
/// say, leaves the policies it concerns reported as not enforced).
fn logged<T>(
    what: &str,
    event: Result<watcher::Event<T>, watcher::Error>,
) -> Option<watcher::Event<T>> {
    event
        .map_err(|e| tracing::warn!(error = %e, "watching {what} failed; retrying"))
        .ok()
}

/// Waits until the API server answers (its version), retrying every 2 s and logging each failure.
async fn reachable(client: &Client) {
    loop {
        match client.apiserver_version().await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "the API server does not answer yet; not ready");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

/// Ready once the API server answers: a standby is ready too (it takes over when the leader
/// goes), so readiness never waits for a Lease another replica holds. Then the Lease, when
/// leader election is on.
async fn ready_then_lead(
    client: &Client,
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<Option<Leadership>> {
    reachable(client).await;
    metrics.ready.store(true, Ordering::Relaxed);
    if !config.leader_election.enabled {
        return Ok(None);
    }
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("palisade-operator-{}", std::process::id()));
    Ok(Some(
        Leadership::acquire(client.clone(), &config.leader_election, identity).await?,
    ))
}

/// Wires the watch of each generated kind to the controller whose policies generate it.
fn watch_generated(
    mut auth_ctl: Controller<AuthPolicy>,
    mut rl_ctl: Controller<RateLimitPolicy>,
    streams: Vec<controller::KindStream>,
    state: &State,
) -> (Controller<AuthPolicy>, Controller<RateLimitPolicy>) {
    for ((api_version, kind), ar, stream) in streams {
        let key = (api_version.as_str(), kind.as_str());
        if key == ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID") {
            // Cluster-scoped: no owner reference, so map back by the owner labels.
            auth_ctl = auth_ctl.watches_stream_with(
                stream,
                |o: crate::controller::generated::GeneratedObject| {
                    let labels = o.labels();
                    let name = labels.get(OWNER_NAME_LABEL).cloned();
                    let ns = labels.get(OWNER_NAMESPACE_LABEL).cloned();
                    name.zip(ns)
                        .map(|(n, ns)| kube::runtime::reflector::ObjectRef::new(&n).within(&ns))
                },
                ar,
            );
        } else if controller::AUTH_KINDS.contains(&key) {
            auth_ctl = auth_ctl.owns_stream_with(stream, ar);
        } else if key == ("gateway.envoyproxy.io/v1alpha1", "BackendTrafficPolicy")
            && let Some(btp) = state.kinds.get(&(api_version.clone(), kind.clone()))
        {
            // Besides its owner, a route's policy wakes the Gateway-level policy Envoy Gateway
            // merges it into (gathered): whether that one is enforced as written depends on the
            // merge.
            let (merged, wakes) = tokio::sync::mpsc::unbounded_channel();
            rl_ctl = rl_ctl.reconcile_on(gathered(wakes)).watches_stream_with(
                stream,
                rate_limit_wakes(btp.store.clone(), btp.resource.clone(), merged),
                ar,
            );
        } else {
            rl_ctl = rl_ctl.owns_stream_with(stream, ar);
        }
    }
    (auth_ctl, rl_ctl)
}

/// How long the Gateway-level policies that route policies are merged into gather wake-ups
/// before they are judged again: while Envoy Gateway reports on a thousand routes one after the
/// other, a Gateway-level policy is judged about once a second, not once per route.
const MERGED_WAKE_GATHER: std::time::Duration = std::time::Duration::from_secs(1);

/// Which RateLimitPolicies a change to a BackendTrafficPolicy wakes: its owners at once; the
/// owners of the Gateway-level policies (found in `store`) it is merged into are sent to `merged`,
/// for [`gathered`].
fn rate_limit_wakes(
    store: kube::runtime::reflector::Store<crate::controller::generated::GeneratedObject>,
    resource: kube::api::ApiResource,
    merged: tokio::sync::mpsc::UnboundedSender<
        kube::runtime::reflector::ObjectRef<RateLimitPolicy>,
    >,
) -> impl Fn(
    crate::controller::generated::GeneratedObject,
) -> Vec<kube::runtime::reflector::ObjectRef<RateLimitPolicy>>
+ Send
+ Sync
+ 'static {
    move |o| {
        let status = o
            .status
            .as_deref()
            .and_then(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok());
        for (ns, name) in status
            .as_ref()
            .map(controller::gateway::merged_into)
            .unwrap_or_default()
        {
            let into =
                kube::runtime::reflector::ObjectRef::new_with(&name, resource.clone()).within(&ns);
            if let Some(gateway_level) = store.get(&into) {
                for owner in rate_limit_owners(&gateway_level) {
                    // An error means nobody listens: the controller has stopped.
                    let _ = merged.send(owner);
                }
            }
        }
        rate_limit_owners(&o)
    }
}

/// The policies sent on `wakes`, each once per [`MERGED_WAKE_GATHER`] at most.
fn gathered(
    wakes: tokio::sync::mpsc::UnboundedReceiver<
        kube::runtime::reflector::ObjectRef<RateLimitPolicy>,
    >,
) -> impl futures::Stream<Item = kube::runtime::reflector::ObjectRef<RateLimitPolicy>> {
    futures::stream::unfold(wakes, |mut wakes| async move {
        let first = wakes.recv().await?;
        tokio::time::sleep(MERGED_WAKE_GATHER).await;
        let mut due = std::collections::HashSet::from([first]);
        while let Ok(more) = wakes.try_recv() {
            due.insert(more);
        }
        Some((futures::stream::iter(due), wakes))
    })
    .flatten()
}

/// The RateLimitPolicies that own `o`.
fn rate_limit_owners(
    o: &crate::controller::generated::GeneratedObject,
) -> Vec<kube::runtime::reflector::ObjectRef<RateLimitPolicy>> {
    let ns = o.metadata.namespace.as_deref().unwrap_or_default();
    o.metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|r| {
            r.kind == <RateLimitPolicy as kube::Resource>::kind(&())
                && r.api_version == <RateLimitPolicy as kube::Resource>::api_version(&())
        })
        .map(|r| kube::runtime::reflector::ObjectRef::new(&r.name).within(ns))
        .collect()
}

/// The RateLimitPolicy controller's state, with routes, Gateways and classes: a change of where
/// a target receives traffic wakes the policies it concerns.
async fn rate_limit_state(
    ctl: Controller<RateLimitPolicy>,
    client: &Client,
    state: &Arc<State>,
) -> (Controller<RateLimitPolicy>, Arc<ratelimit::RateLimitState>) {
    let policies = ctl.store();
    tokio::spawn(Metrics::count_ready_every(
        Arc::clone(&state.metrics),
        "RateLimitPolicy",
        policies.clone(),
    ));
    let (ctl, topology) = match controller::topology::start(client).await {
        Some((topology, changes)) => {
            let (store, topo) = (policies.clone(), topology.clone());
            let ctl = ctl.reconcile_on(changes.flat_map(move |c| {
                futures::stream::iter(controller::topology::concerned(&store, &topo, &c))
            }));
            (ctl, Some(topology))
        }
        None => (ctl, None),
    };
    let rl_state = Arc::new(ratelimit::RateLimitState {
        shared: Arc::clone(state),
        policies,
        topology,
    });
    (ctl, rl_state)
}

/// Runs the operator until `shutdown` resolves or leadership is lost.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let shutdown = shutdown.shared();
    let server = tokio::spawn(metrics::serve(
        config.metrics_address,
        Arc::clone(&metrics),
        shutdown.clone(),
    ));

    let leadership = tokio::select! {
        l = ready_then_lead(&client, &config, &metrics) => l?,
        () = shutdown.clone() => return Ok(()),
    };

    let discovered = controller::discover(&client).await;
    let echoes = Arc::new(controller::apply::Echoes::default());
    let (kinds, streams) = controller::stores(&client, &discovered, &echoes);
    let state = Arc::new(State {
        client: client.clone(),
        ctx: config.context.clone(),
        kinds,
        recorder: controller::recorder(client.clone()),
        metrics: Arc::clone(&metrics),
        applied: controller::apply::AppliedCache::default(),
        echoes: Arc::clone(&echoes),
    });

    // Bounded concurrency keeps connections, memory and API server load in proportion.
    let ctl_config = kube::runtime::controller::Config::default().concurrency(config.concurrency);
    // ALLOW policies add up: a change to one AuthPolicy can widen or narrow what the others on
    // the same workloads promise. RateLimitPolicies on one target decide together who wins.
    let rl_related: Related<RateLimitPolicy> =
        Arc::new(|store, p, _| ratelimit::same_target(store, p));
    let root = config.context.mesh_root_namespace.clone();
    let overlaps = Arc::new(auth::Overlaps::default());
    let observed = Arc::clone(&overlaps);
    let auth_related = overlapping_policies(&overlaps);
    let auth_ctl = controller_for(
        &client,
        &echoes,
        Some((auth_related, root.clone())),
        move |e| observed.observe(e),
    )
    .with_config(ctl_config.clone());
    let rl_ctl = controller_for(&client, &echoes, Some((rl_related, root)), |_| ())
        .with_config(ctl_config.clone());
    let (auth_ctl, rl_ctl) = watch_generated(auth_ctl, rl_ctl, streams, &state);
    let (auth_ctl, auth_state) = with_caches(auth_ctl, &client, &state, overlaps);
    let (rl_ctl, rl_state) = rate_limit_state(rl_ctl, &client, &state).await;

    let sb_run = secret_binding_controller(
        &client,
        &config,
        ctl_config,
        &state,
        &metrics,
        shutdown.clone(),
    );
    let certs_run = certificate_keeper(&client, &config, shutdown.clone());

    let auth_run = auth_ctl
        .graceful_shutdown_on(shutdown.clone())
        .run(auth::reconcile, error_policy, auth_state)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "AuthPolicy controller");
            }
        });
    let rl_run = rl_ctl
        .graceful_shutdown_on(shutdown.clone())
        .run(ratelimit::reconcile, error_policy, rl_state)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "RateLimitPolicy controller");
            }
        });
    metrics.set_leading(true);
    tracing::info!(kinds = discovered.len(), "controllers running");

    let outcome = while_leading(
        leadership,
        futures::future::join4(auth_run, rl_run, sb_run, certs_run).map(|_| ()),
    )
    .await;
    metrics.set_leading(false);
    metrics.ready.store(false, Ordering::Relaxed);
    server.abort();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::ObjectRef;
    use serde_json::json;

    #[tokio::test]
    async fn merged_wakes_are_gathered_each_policy_once() {
        let (send, wakes) = tokio::sync::mpsc::unbounded_channel();
        let edge = ObjectRef::<RateLimitPolicy>::new("edge").within("shop");
        let other = ObjectRef::<RateLimitPolicy>::new("other-edge").within("shop");
        for r in [&edge, &other, &edge, &edge] {
            send.send(r.clone()).expect("send");
        }
        let mut stream = std::pin::pin!(gathered(wakes));
        let started = std::time::Instant::now();
        let mut got = vec![
            stream.next().await.expect("first"),
            stream.next().await.expect("second"),
        ];
        assert!(started.elapsed() >= MERGED_WAKE_GATHER);
        got.sort_by_key(|r| r.name.clone());
        assert_eq!(got, vec![edge.clone(), other]);
        // Nothing more until the next wake; the stream ends with its senders.
        send.send(edge.clone()).expect("send");
        assert_eq!(stream.next().await, Some(edge));
        drop(send);
        assert_eq!(stream.next().await, None);
    }

    fn policy(name: &str, app: Option<&str>, generation: i64) -> AuthPolicy {
        let mut spec = json!({"rules": [{}]});
        if let Some(app) = app {
            spec["selector"] = json!({"matchLabels": {"app": app}});
            spec["rules"] = json!([{"from": [{"serviceAccount": {"name": "frontend"}}]}]);
        }
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": name, "namespace": "shop", "generation": generation},
            "spec": spec,
        }))
        .expect("policy")
    }

    fn names(refs: &[ObjectRef<AuthPolicy>]) -> Vec<&str> {
        refs.iter().map(|r| r.name.as_str()).collect()
    }

    /// The siblings of a changed AuthPolicy are found, before the cache takes the change in,
    /// for the policy as it was and as it is; a status write (same generation) and the
    /// objects of a (re-)list relate to nothing; a deleted policy names the ones it overlapped.
    #[test]
    fn spec_changes_wake_the_policies_they_concern() {
        let (cache, writer) = reflector::store::<AuthPolicy>();
        let writer = std::cell::RefCell::new(writer);
        let overlaps = Arc::new(auth::Overlaps::default());
        let related = overlapping_policies(&overlaps);
        overlaps.observe(&watcher::Event::Init);
        for p in [
            policy("orders", Some("orders"), 1),
            policy("payments", Some("payments"), 1),
            policy("open", Some("orders"), 1),
        ] {
            overlaps.observe(&watcher::Event::InitApply(p.clone()));
            writer
                .borrow_mut()
                .apply_watcher_event(&watcher::Event::Apply(p));
        }
        overlaps.observe(&watcher::Event::InitDone);
        // As the controller does: the index takes the event in, then the related policies are
        // found. Each answer is also the one a scan of the whole cache gives.
        let changes = |e: &watcher::Event<AuthPolicy>| {
            overlaps.observe(e);
            let indexed = spec_changes(&cache, e, &*related, "istio-system");
            let scanned = spec_changes(&cache, e, &auth::overlapping_in_cache, "istio-system");
            let sorted = |mut refs: Vec<ObjectRef<AuthPolicy>>| {
                refs.sort_by(|x, y| x.name.cmp(&y.name));
                refs
            };
            let (indexed, scanned) = (sorted(indexed), sorted(scanned));
            assert_eq!(indexed, scanned, "{e:?}");
            // Then the cache takes it in, as the controller's reflector does.
            writer.borrow_mut().apply_watcher_event(e);
            indexed
        };

        // Status only: the generation is the cached one.
        assert!(changes(&watcher::Event::Apply(policy("open", Some("orders"), 1))).is_empty());
        // `open` moves from orders to namespace-wide: orders (before and after) and payments.
        let widened = changes(&watcher::Event::Apply(policy("open", None, 2)));
        assert_eq!(names(&widened), ["orders", "payments"]);
        // `open` narrows to payments: both (it left orders), once each.
        let moved = changes(&watcher::Event::Apply(policy("open", Some("payments"), 3)));
        assert_eq!(names(&moved), ["orders", "payments"]);
        // A new policy wakes the ones it overlaps.
        let new = changes(&watcher::Event::Apply(policy("new", Some("payments"), 1)));
        assert_eq!(names(&new), ["open", "payments"]);
        // Deleted: the ones it overlapped.
        let gone = changes(&watcher::Event::Delete(policy("open", Some("payments"), 3)));
        assert_eq!(names(&gone), ["new", "payments"]);
        // A re-list wakes nothing one by one (the completed list reconciles every policy).
        assert!(changes(&watcher::Event::InitApply(policy("x", None, 1))).is_empty());
    }

    fn policy_in(ns: &str, name: &str, labels: &[(&str, &str)], generation: i64) -> AuthPolicy {
        let mut spec = json!({"rules": [{}]});
        if !labels.is_empty() {
            let labels: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), json!(v)))
                .collect();
            spec["selector"] = json!({"matchLabels": labels});
        }
        serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "AuthPolicy",
            "metadata": {"name": name, "namespace": ns, "generation": generation},
            "spec": spec,
        }))
        .expect("policy")
    }

    /// The index wakes what a scan of the cache wakes, and only what overlaps: candidates it
    /// offers that do not overlap (a mesh-root policy, a policy with more keys) are left out,
    /// other namespaces are never woken, a deleted policy and one a re-list dropped no longer
    /// are.
    #[test]
    fn the_index_wakes_what_the_cache_would() {
        let (cache, writer) = reflector::store::<AuthPolicy>();
        let writer = std::cell::RefCell::new(writer);
        let overlaps = Arc::new(auth::Overlaps::default());
        let related = overlapping_policies(&overlaps);
        let changes = |e: &watcher::Event<AuthPolicy>| -> Vec<String> {
            overlaps.observe(e);
            let indexed = spec_changes(&cache, e, &*related, "istio-system");
            let scanned = spec_changes(&cache, e, &auth::overlapping_in_cache, "istio-system");
            writer.borrow_mut().apply_watcher_event(e);
            let named = |refs: Vec<ObjectRef<AuthPolicy>>| {
                let mut n: Vec<String> = refs
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name))
                    .collect();
                n.sort();
                n
            };
            let (indexed, scanned) = (named(indexed), named(scanned));
            assert_eq!(indexed, scanned, "{e:?}");
            indexed
        };
        let listed = [
            policy_in("shop", "orders", &[("app", "orders")], 1),
            policy_in("shop", "payments", &[("app", "payments")], 1),
            policy_in("shop", "open", &[("app", "orders")], 1),
            policy_in("shop", "web", &[("app", "orders"), ("tier", "web")], 1),
            policy_in("shop", "db", &[("app", "orders"), ("tier", "db")], 1),
            policy_in("istio-system", "mesh", &[("app", "payments")], 1),
            policy_in("pay", "orders", &[("app", "orders")], 1),
        ];
        assert!(changes(&watcher::Event::Init).is_empty());
        for p in &listed {
            assert!(changes(&watcher::Event::InitApply(p.clone())).is_empty());
        }
        assert!(changes(&watcher::Event::InitDone).is_empty());

        // db (another tier) and mesh (another app) are candidates, and do not overlap.
        let web = policy_in("shop", "web", &[("app", "orders"), ("tier", "web")], 2);
        assert_eq!(
            changes(&watcher::Event::Apply(web)),
            ["shop/open", "shop/orders"]
        );
        // A mesh-root policy reaches into the namespace.
        let payments = policy_in("shop", "payments", &[("app", "payments")], 2);
        assert_eq!(
            changes(&watcher::Event::Apply(payments.clone())),
            ["istio-system/mesh"]
        );
        // Another namespace's policy wakes nothing in shop.
        let pay = policy_in("pay", "orders", &[("app", "orders")], 2);
        assert!(changes(&watcher::Event::Apply(pay.clone())).is_empty());
        // A deletion wakes what the policy overlapped; after it, it is woken no more.
        let open = policy_in("shop", "open", &[("app", "orders")], 1);
        assert_eq!(
            changes(&watcher::Event::Delete(open)),
            ["shop/db", "shop/orders", "shop/web"]
        );
        let new = policy_in("shop", "new", &[], 1);
        assert_eq!(
            changes(&watcher::Event::Apply(new.clone())),
            [
                "istio-system/mesh",
                "shop/db",
                "shop/orders",
                "shop/payments",
                "shop/web"
            ]
        );
        // A re-list that drops web and brings late: nothing wakes one by one, and afterwards
        // web is gone for the index as for the cache.
        assert!(changes(&watcher::Event::Init).is_empty());
        let late = policy_in("shop", "late", &[("app", "payments")], 1);
        for p in [
            policy_in("shop", "orders", &[("app", "orders")], 1),
            payments,
            policy_in("shop", "db", &[("app", "orders"), ("tier", "db")], 1),
            policy_in("istio-system", "mesh", &[("app", "payments")], 1),
            pay,
            new,
            late,
        ] {
            assert!(changes(&watcher::Event::InitApply(p)).is_empty());
        }
        assert!(changes(&watcher::Event::InitDone).is_empty());
        let late = policy_in("shop", "late", &[("app", "orders")], 2);
        assert_eq!(
            changes(&watcher::Event::Apply(late)),
            [
                "istio-system/mesh",
                "shop/db",
                "shop/new",
                "shop/orders",
                "shop/payments"
            ]
        );
    }

    /// An event is an echo only when it carries exactly the resource version our last write to
    /// that object produced, and only once.
    #[test]
    fn only_the_exact_result_of_our_write_is_an_echo() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let meta = |uid: &str, rv: &str| ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
            ..ObjectMeta::default()
        };
        let echoes = controller::apply::Echoes::default();
        echoes.wrote(&meta("a", "10"));
        assert_eq!(echoes.pending(), 1);
        assert!(!echoes.is_echo(&meta("a", "9")), "an older state");
        assert!(!echoes.is_echo(&meta("a", "11")), "someone else's write");
        assert!(!echoes.is_echo(&meta("b", "10")), "another object");
        assert!(echoes.is_echo(&meta("a", "10")));
        assert_eq!(echoes.pending(), 0);
        assert!(!echoes.is_echo(&meta("a", "10")), "each write echoes once");
        assert!(!echoes.is_echo(&ObjectMeta::default()));
        // Writes whose echo never comes (the object was deleted) do not pile up.
        for i in 0..70_000 {
            echoes.wrote(&meta(&format!("gone-{i}"), "1"));
        }
        assert!(echoes.pending() <= 65_536, "{}", echoes.pending());
    }
}
