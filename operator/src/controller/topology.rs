//! Where a RateLimitPolicy's target receives traffic: the Gateways an HTTPRoute is attached to,
//! and whether Envoy Gateway controls each (its GatewayClass's `controllerName`). Envoy Gateway
//! reports on a BackendTrafficPolicy only for the Gateways it controls, and leaves its last
//! verdict in place when a route or Gateway moves away from it; so the verdict alone cannot
//! show a parent Gateway of another class (its traffic is not limited) or a stale `Accepted`.
//!
//! Three caches, each keeping only the field it needs (`spec.parentRefs`, `spec.gatewayClassName`,
//! `spec.controllerName`); a change of a route's or Gateway's spec wakes the policies it concerns.

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        PredicateConfig, WatchStreamExt, predicates,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use palisade_api::RateLimitPolicy;
use serde_json::Value;

/// Envoy Gateway's controller names start with this (its default is
/// `gateway.envoyproxy.io/gatewayclass-controller`).
pub const ENVOY_GATEWAY_CONTROLLER_PREFIX: &str = "gateway.envoyproxy.io/";

const GROUP: &str = "gateway.networking.k8s.io";

/// The cached Gateway API objects.
#[derive(Clone)]
pub struct Topology {
    /// HTTPRoutes (spec.parentRefs only).
    pub routes: Store<DynamicObject>,
    /// Gateways (spec.gatewayClassName only).
    pub gateways: Store<DynamicObject>,
    /// GatewayClasses (spec.controllerName only).
    pub classes: Store<DynamicObject>,
}

/// One Gateway a target receives traffic through, and whether Envoy Gateway controls it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// `namespace/name`.
    pub gateway: String,
    /// Why Envoy Gateway does not enforce anything there, if it does not.
    pub uncovered: Option<String>,
}

/// The parent Gateways of the target of `policy`: the Gateway itself, or an HTTPRoute's
/// `parentRefs`. `Err` when the target is not known (yet).
pub fn parents(topology: &Topology, policy: &RateLimitPolicy) -> Result<Vec<Parent>, String> {
    let ns = policy.namespace().unwrap_or_default();
    let target = &policy.spec.target_ref;
    let names: Vec<(String, String)> = match target.kind.as_str() {
        "Gateway" => vec![(ns.clone(), target.name.clone())],
        "HTTPRoute" => {
            let route = topology
                .routes
                .get(
                    &ObjectRef::new_with(&target.name, resource("HTTPRoute", "httproutes"))
                        .within(&ns),
                )
                .ok_or_else(|| format!("HTTPRoute {ns}/{} does not exist", target.name))?;
            let mut out = Vec::new();
            for p in route.data["spec"]["parentRefs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let group = p["group"].as_str().unwrap_or(GROUP);
                let kind = p["kind"].as_str().unwrap_or("Gateway");
                let pns = p["namespace"].as_str().unwrap_or(&ns).to_owned();
                let name = p["name"].as_str().unwrap_or_default().to_owned();
                if group != GROUP || kind != "Gateway" {
                    return Err(format!(
                        "HTTPRoute {ns}/{} has a parent of kind {kind} ({pns}/{name}), which is not checked",
                        target.name
                    ));
                }
                out.push((pns, name));
            }
            out.sort();
            out.dedup();
            out
        }
        other => return Err(format!("targets of kind {other} are not checked")),
    };
    Ok(names
        .into_iter()
        .map(|(gns, name)| {
            let gateway = format!("{gns}/{name}");
            let uncovered = covered(topology, &gns, &name).err();
            Parent { gateway, uncovered }
        })
        .collect())
}

fn covered(topology: &Topology, ns: &str, name: &str) -> Result<(), String> {
    let gw = topology
        .gateways
        .get(&ObjectRef::new_with(name, resource("Gateway", "gateways")).within(ns))
        .ok_or_else(|| format!("Gateway {ns}/{name} does not exist"))?;
    let class = gw.data["spec"]["gatewayClassName"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let controller = topology
        .classes
        .get(&ObjectRef::new_with(
            &class,
            resource("GatewayClass", "gatewayclasses"),
        ))
        .and_then(|c| c.data["spec"]["controllerName"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("GatewayClass {class:?} of Gateway {ns}/{name} does not exist"))?;
    if controller.starts_with(ENVOY_GATEWAY_CONTROLLER_PREFIX) {
        Ok(())
    } else {
        Err(format!(
            "Gateway {ns}/{name} is of GatewayClass {class:?}, controlled by {controller}, not \
             Envoy Gateway: its traffic is not limited"
        ))
    }
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural)
}

/// A change of a Gateway API object: the route, Gateway or class that changed.
#[derive(Clone, Debug)]
pub enum Changed {
    /// An HTTPRoute `namespace`, `name`.
    Route(String, String),
    /// A Gateway `namespace`, `name`.
    Gateway(String, String),
    /// A GatewayClass.
    Class,
}

/// The caches and one stream of spec changes, when the cluster serves the Gateway API.
pub async fn start(client: &Client) -> Option<(Topology, BoxStream<'static, Changed>)> {
    let kinds = [
        ("HTTPRoute", "httproutes", "parentRefs"),
        ("Gateway", "gateways", "gatewayClassName"),
        ("GatewayClass", "gatewayclasses", "controllerName"),
    ];
    for (kind, _, _) in kinds {
        if let Err(e) =
            kube::discovery::pinned_kind(client, &GroupVersionKind::gvk(GROUP, "v1", kind)).await
        {
            tracing::warn!(%kind, error = %e, "the Gateway API is not served; rate limit targets are not checked");
            return None;
        }
    }
    let mut stores = Vec::new();
    let mut streams = Vec::new();
    for (kind, plural, field) in kinds {
        let ar = resource(kind, plural);
        let writer = reflector::store::Writer::new(ar.clone());
        stores.push(writer.as_reader());
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        let kind = kind.to_owned();
        let s = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(move |o| {
                let keep = o.data["spec"][field].clone();
                o.data = serde_json::json!({"spec": {field: keep}});
                o.metadata.managed_fields = None;
                o.metadata.annotations = None;
                o.metadata.labels = None;
            })
            .reflect(writer)
            .touched_objects()
            .predicate_filter(predicates::generation, PredicateConfig::default())
            .filter_map(move |r| {
                let changed = r.ok().map(|o| {
                    let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
                    match kind.as_str() {
                        "HTTPRoute" => Changed::Route(ns, name),
                        "Gateway" => Changed::Gateway(ns, name),
                        _ => Changed::Class,
                    }
                });
                std::future::ready(changed)
            })
            .boxed();
        streams.push(s);
    }
    let classes = stores.pop()?;
    let gateways = stores.pop()?;
    let routes = stores.pop()?;
    Some((
        Topology {
            routes,
            gateways,
            classes,
        },
        futures::stream::select_all(streams).boxed(),
    ))
}

/// The RateLimitPolicies a change concerns: those targeting the route or Gateway, and those
/// targeting a route attached to the Gateway; every one for a GatewayClass.
pub fn concerned(
    policies: &Store<RateLimitPolicy>,
    topology: &Topology,
    changed: &Changed,
) -> Vec<ObjectRef<RateLimitPolicy>> {
    let targets = |p: &RateLimitPolicy, kind: &str, ns: &str, name: &str| {
        p.namespace().as_deref() == Some(ns)
            && p.spec.target_ref.kind == kind
            && p.spec.target_ref.name == name
    };
    policies
        .state()
        .iter()
        .filter(|p| match changed {
            Changed::Route(ns, name) => targets(p, "HTTPRoute", ns, name),
            Changed::Gateway(ns, name) => {
                targets(p, "Gateway", ns, name)
                    || (p.spec.target_ref.kind == "HTTPRoute"
                        && parents(topology, p)
                            .is_ok_and(|ps| ps.iter().any(|x| x.gateway == format!("{ns}/{name}"))))
            }
            Changed::Class => true,
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// A parent's ancestor key as Envoy Gateway writes it (`namespace/name` of a Gateway).
pub fn ancestor_key(ancestor: &Value) -> String {
    let r = &ancestor["ancestorRef"];
    format!(
        "{}/{}",
        r["namespace"].as_str().unwrap_or_default(),
        r["name"].as_str().unwrap_or_default()
    )
}
