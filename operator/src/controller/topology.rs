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
        WatchStreamExt,
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
    /// The `controllerName` of its GatewayClass: only a verdict written under that name counts.
    pub controller: String,
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
    // A parent Gateway that does not exist carries no traffic (its creation wakes the policy).
    Ok(names
        .into_iter()
        .filter_map(|(gns, name)| {
            let gw = topology
                .gateways
                .get(&ObjectRef::new_with(&name, resource("Gateway", "gateways")).within(&gns))?;
            let gateway = format!("{gns}/{name}");
            Some(match covered(topology, &gw, &gns, &name) {
                Ok(controller) => Parent {
                    gateway,
                    controller,
                    uncovered: None,
                },
                Err((controller, why)) => Parent {
                    gateway,
                    controller,
                    uncovered: Some(why),
                },
            })
        })
        .collect())
}

/// The controller name of the Gateway's class, or it and why Envoy Gateway does not enforce there.
fn covered(
    topology: &Topology,
    gw: &DynamicObject,
    ns: &str,
    name: &str,
) -> Result<String, (String, String)> {
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
        .ok_or_else(|| {
            (
                String::new(),
                format!("GatewayClass {class:?} of Gateway {ns}/{name} does not exist"),
            )
        })?;
    if controller.starts_with(ENVOY_GATEWAY_CONTROLLER_PREFIX) {
        Ok(controller)
    } else {
        let why = format!(
            "Gateway {ns}/{name} is of GatewayClass {class:?}, controlled by {controller}, not \
             Envoy Gateway: its traffic is not limited"
        );
        Err((controller, why))
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
    /// A GatewayClass, or the end of a (re)list: every policy.
    All,
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
        let mut generations = std::collections::HashMap::new();
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
            .filter_map(move |event| std::future::ready(woken(&kind, &mut generations, event)))
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

/// What an event of the watch of `kind` wakes, once the cache holds it. A change of an object's
/// spec (a new generation; labels, annotations and status are not looked at) or its deletion
/// wakes the policies it concerns; the objects of a (re)list become visible in the cache only
/// when the list is done, so its end wakes every policy, and its objects nothing.
fn woken(
    kind: &str,
    generations: &mut std::collections::HashMap<String, Option<i64>>,
    event: Result<watcher::Event<DynamicObject>, watcher::Error>,
) -> Option<Changed> {
    let changed = |o: &DynamicObject| {
        let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
        match kind {
            "HTTPRoute" => Changed::Route(ns, name),
            "Gateway" => Changed::Gateway(ns, name),
            _ => Changed::All,
        }
    };
    match event.ok()? {
        watcher::Event::Init => None,
        watcher::Event::InitApply(o) => {
            generations.insert(o.uid()?, o.metadata.generation);
            None
        }
        watcher::Event::InitDone => Some(Changed::All),
        watcher::Event::Apply(o) => {
            let uid = o.uid()?;
            (generations.insert(uid, o.metadata.generation) != Some(o.metadata.generation))
                .then(|| changed(&o))
        }
        watcher::Event::Delete(o) => {
            generations.remove(&o.uid()?);
            Some(changed(&o))
        }
    }
}

/// Whether the three caches hold a complete list (a policy reconciled before would see routes
/// and Gateways missing).
pub fn ready(topology: &Topology) -> bool {
    use futures::FutureExt;
    [&topology.routes, &topology.gateways, &topology.classes]
        .iter()
        .all(|s| {
            s.wait_until_ready()
                .now_or_never()
                .is_some_and(|r| r.is_ok())
        })
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
            Changed::All => true,
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// Whether a status ancestor is about `parent`: a Gateway of that `namespace/name`, reported
/// under the controller name of its class (a verdict left by another controller, or for an
/// object of another kind, does not count).
pub fn is_ancestor(ancestor: &Value, parent: &Parent) -> bool {
    let r = &ancestor["ancestorRef"];
    let group = r["group"].as_str().unwrap_or(GROUP);
    let kind = r["kind"].as_str().unwrap_or("Gateway");
    group == GROUP
        && kind == "Gateway"
        && ancestor["controllerName"].as_str() == Some(parent.controller.as_str())
        && format!(
            "{}/{}",
            r["namespace"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default()
        ) == parent.gateway
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;

    fn object(
        kind: &str,
        ns: Option<&str>,
        name: &str,
        generation: i64,
        spec: &Value,
    ) -> DynamicObject {
        let mut v = json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
            "metadata": {"name": name, "uid": format!("uid-{name}"), "generation": generation},
            "spec": spec,
        });
        if let Some(ns) = ns {
            v["metadata"]["namespace"] = json!(ns);
        }
        serde_json::from_value(v).expect("object")
    }

    fn store(kind: &str, plural: &str, objects: Vec<DynamicObject>) -> Store<DynamicObject> {
        let mut writer = reflector::store::Writer::new(resource(kind, plural));
        writer.apply_watcher_event(&Event::Init);
        for o in objects {
            writer.apply_watcher_event(&Event::InitApply(o));
        }
        writer.apply_watcher_event(&Event::InitDone);
        writer.as_reader()
    }

    #[test]
    fn a_relist_wakes_everything_once_it_is_visible_and_unchanged_specs_nothing() {
        let mut generations = std::collections::HashMap::new();
        let route = |g| object("HTTPRoute", Some("shop"), "api", g, &json!({}));
        let mut step = |e: Event<DynamicObject>| woken("HTTPRoute", &mut generations, Ok(e));
        assert!(step(Event::Init).is_none());
        assert!(
            step(Event::InitApply(route(1))).is_none(),
            "not visible in the cache yet"
        );
        assert!(matches!(step(Event::InitDone), Some(Changed::All)));
        assert!(step(Event::Apply(route(1))).is_none(), "a status write");
        assert!(
            matches!(step(Event::Apply(route(2))), Some(Changed::Route(ns, n)) if ns == "shop" && n == "api")
        );
        assert!(matches!(
            step(Event::Delete(route(2))),
            Some(Changed::Route(..))
        ));
        assert!(
            matches!(step(Event::Apply(route(2))), Some(Changed::Route(..))),
            "made anew"
        );
    }

    #[test]
    fn parents_of_a_route() {
        let eg = json!({"controllerName": "gateway.envoyproxy.io/gatewayclass-controller"});
        let topology = Topology {
            routes: store(
                "HTTPRoute",
                "httproutes",
                vec![object(
                    "HTTPRoute",
                    Some("shop"),
                    "api",
                    1,
                    &json!({"parentRefs": [{"name": "shop"}, {"name": "side"}, {"name": "gone"},
                                           {"name": "edge", "namespace": "infra", "sectionName": "http"}]}),
                )],
            ),
            gateways: store(
                "Gateway",
                "gateways",
                vec![
                    object(
                        "Gateway",
                        Some("shop"),
                        "shop",
                        1,
                        &json!({"gatewayClassName": "eg"}),
                    ),
                    object(
                        "Gateway",
                        Some("shop"),
                        "side",
                        1,
                        &json!({"gatewayClassName": "other"}),
                    ),
                    object(
                        "Gateway",
                        Some("infra"),
                        "edge",
                        1,
                        &json!({"gatewayClassName": "eg"}),
                    ),
                ],
            ),
            classes: store(
                "GatewayClass",
                "gatewayclasses",
                vec![
                    object("GatewayClass", None, "eg", 1, &eg),
                    object(
                        "GatewayClass",
                        None,
                        "other",
                        1,
                        &json!({"controllerName": "example.com/other"}),
                    ),
                ],
            ),
        };
        let policy: RateLimitPolicy = serde_json::from_value(json!({
            "apiVersion": "palisade.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"targetRef": {"group": GROUP, "kind": "HTTPRoute", "name": "api"},
                     "limits": [{"name": "all", "requests": 1, "per": "1s"}]},
        }))
        .expect("policy");
        let parents = parents(&topology, &policy).expect("known route");
        let names: Vec<&str> = parents.iter().map(|p| p.gateway.as_str()).collect();
        // A parent that does not exist carries no traffic; the others, cross-namespace included.
        assert_eq!(names, ["infra/edge", "shop/shop", "shop/side"]);
        assert!(parents[0].uncovered.is_none() && parents[1].uncovered.is_none());
        assert!(
            parents[2]
                .uncovered
                .as_deref()
                .is_some_and(|w| w.contains("example.com/other"))
        );
        assert_eq!(parents[2].controller, "example.com/other");
        let mut missing = policy.clone();
        missing.spec.target_ref.name = "nope".into();
        assert!(super::parents(&topology, &missing).is_err());
    }
}
