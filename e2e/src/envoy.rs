//! A reference evaluator of the Envoy configuration istiod sends a sidecar: which inbound filter
//! chain a connection lands on, and what its network RBAC, JWT authentication and HTTP RBAC
//! filters decide for one request. It reads the JSON `xdsdump` prints (the protobuf JSON form of
//! Envoy's own messages) and refuses to guess: a field it does not model is an error, so a
//! configuration it cannot read never counts as a decision.
//!
//! Matching follows Envoy's documented semantics: a filter chain is chosen by destination port,
//! destination address, transport protocol and application protocols, each level preferring a
//! specific match to an unspecified one; an RBAC filter with `ALLOW` lets a request through when
//! one of its policies matches (a policy matches when one permission and one principal do),
//! `DENY` stops it when one matches, and a filter without `rules` decides nothing; string
//! matchers are exact, prefix, suffix, contains or an RE2 regex matching the whole value.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

/// One listener push as `xdsdump` prints it.
#[derive(Clone, Debug, Deserialize)]
pub struct Push {
    /// istiod's version of this push.
    pub version: String,
    /// The filter chains of the printed listener(s).
    pub chains: Vec<Chain>,
}

impl Push {
    /// The names of every RBAC policy in the push (Istio names them
    /// `ns[<namespace>]-policy[<name>]-rule[<i>]`).
    pub fn rbac_policies(&self) -> std::collections::BTreeSet<&str> {
        self.chains
            .iter()
            .flat_map(|c| c.network_rbac.iter().chain(&c.http_rbac))
            .filter_map(|f| f["rules"]["policies"].as_object())
            .flat_map(|p| p.keys().map(String::as_str))
            .collect()
    }
}

/// One filter chain and the filters that decide access.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Chain {
    /// The listener it belongs to.
    pub listener: String,
    /// The chain's name.
    pub name: String,
    /// Its `filter_chain_match`.
    #[serde(default)]
    pub r#match: Value,
    /// Network RBAC filters, in order.
    #[serde(default)]
    pub network_rbac: Vec<Value>,
    /// Whether the chain ends in an HTTP connection manager.
    pub http: bool,
    /// HTTP RBAC filters, in order.
    #[serde(default)]
    pub http_rbac: Vec<Value>,
    /// JWT authentication filters.
    #[serde(default)]
    pub jwt_authn: Vec<Value>,
    /// External authorization filters.
    #[serde(default)]
    pub ext_authz: Vec<Value>,
}

/// A request as the sidecar of the destination workload sees it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The destination address and port.
    pub dest: (Ipv4Addr, u16),
    /// The caller's certificate URI SAN, when it speaks mutual TLS.
    pub peer: Option<String>,
    /// Method and path (with any query string), when the connection speaks HTTP.
    pub http: Option<(String, String)>,
    /// The bearer token.
    pub token: Option<Jwt>,
}

/// A signed JWT as the JWT filter sees it.
#[derive(Clone, Debug)]
pub struct Jwt {
    /// The `kid` of the key that signed it: the signature verifies with a provider's JWKS
    /// exactly when that JWKS holds this key.
    pub key_id: String,
    /// Its payload (`iss`, `sub`, ...).
    pub payload: Value,
}

impl Jwt {
    fn issuer(&self) -> &str {
        self.payload["iss"].as_str().unwrap_or_default()
    }
}

/// What the configuration decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request reaches the workload.
    Allowed,
    /// Refused, and by what (`no filter chain`, `jwt_authn`, `rbac <policy>`...).
    Refused(String),
    /// An external authorizer decides (outside this evaluator).
    External,
}

impl Decision {
    /// Whether the request reaches the workload.
    pub fn allowed(&self) -> bool {
        *self == Decision::Allowed
    }
}

/// What `push` decides for `req`.
pub fn decide(push: &Push, req: &Request) -> Result<Decision> {
    let Some(chain) = select_chain(&push.chains, req)? else {
        return Ok(Decision::Refused("no filter chain matches".into()));
    };
    let ctx = Ctx {
        req,
        headers: BTreeMap::new(),
        metadata: Value::Null,
    };
    for rbac in &chain.network_rbac {
        if let Some(refusal) = rbac_refuses(rbac, &ctx).with_context(|| chain.name.clone())? {
            return Ok(Decision::Refused(format!("network {refusal}")));
        }
    }
    if !chain.http {
        return Ok(Decision::Allowed);
    }
    let Some((method, path)) = &req.http else {
        bail!(
            "chain {} speaks HTTP but the request is plain TCP",
            chain.name
        );
    };
    let mut ctx = ctx;
    ctx.headers.insert(":method".into(), method.clone());
    ctx.headers.insert(":path".into(), path.clone());
    for jwt in &chain.jwt_authn {
        match jwt_authn(jwt, req)? {
            Ok(Some(meta)) => ctx.metadata = meta,
            Ok(None) => {}
            Err(why) => return Ok(Decision::Refused(format!("jwt_authn: {why}"))),
        }
    }
    if !chain.ext_authz.is_empty() {
        return Ok(Decision::External);
    }
    for rbac in &chain.http_rbac {
        if let Some(refusal) = rbac_refuses(rbac, &ctx).with_context(|| chain.name.clone())? {
            return Ok(Decision::Refused(format!("http {refusal}")));
        }
    }
    Ok(Decision::Allowed)
}

/// The application protocols a client offers, as Envoy's TLS and HTTP inspectors report them:
/// an Istio peer announces its protocol in ALPN; plain HTTP is detected by the HTTP inspector.
fn alpn(req: &Request) -> Vec<&'static str> {
    match (req.peer.is_some(), req.http.is_some()) {
        (true, true) => vec!["istio-http/1.1", "istio"],
        (true, false) => vec!["istio-peer-exchange", "istio"],
        (false, true) => vec!["http/1.1"],
        (false, false) => vec![],
    }
}

/// One level of filter chain matching: `None` excludes a chain, a higher score is more specific.
type Level<'a> = &'a dyn Fn(&Value) -> Result<Option<u32>>;

/// Envoy's filter chain selection: each level keeps the most specific candidates.
fn select_chain<'a>(chains: &'a [Chain], req: &Request) -> Result<Option<&'a Chain>> {
    const KNOWN: [&str; 4] = [
        "destinationPort",
        "prefixRanges",
        "transportProtocol",
        "applicationProtocols",
    ];
    for c in chains {
        if let Some(m) = c.r#match.as_object()
            && let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str()))
        {
            bail!(
                "chain {}: filter chain match field {k} is not modelled",
                c.name
            );
        }
    }
    let tls = if req.peer.is_some() {
        "tls"
    } else {
        "raw_buffer"
    };
    let offered = alpn(req);
    let levels: [Level<'_>; 4] = [
        &|m| {
            Ok(match m.get("destinationPort").and_then(Value::as_u64) {
                None => Some(0),
                Some(p) => (p == u64::from(req.dest.1)).then_some(1),
            })
        },
        &|m| prefix_score(m.get("prefixRanges"), req.dest.0),
        &|m| {
            Ok(match m.get("transportProtocol").and_then(Value::as_str) {
                None | Some("") => Some(0),
                Some(t) => (t == tls).then_some(1),
            })
        },
        // Envoy takes the first protocol the client offers that some chain lists.
        &|m| {
            Ok(
                match m.get("applicationProtocols").and_then(Value::as_array) {
                    None => Some(0),
                    Some(list) if list.is_empty() => Some(0),
                    Some(list) => offered
                        .iter()
                        .position(|o| list.iter().any(|p| p.as_str() == Some(*o)))
                        .map(|i| u32::try_from(offered.len() - i).unwrap_or(0)),
                },
            )
        },
    ];
    let mut candidates: Vec<&Chain> = chains.iter().collect();
    for level in levels {
        let mut scored = Vec::new();
        for c in candidates {
            if let Some(s) = level(&c.r#match)? {
                scored.push((s, c));
            }
        }
        let Some(best) = scored.iter().map(|(s, _)| *s).max() else {
            return Ok(None);
        };
        candidates = scored
            .into_iter()
            .filter(|(s, _)| *s == best)
            .map(|(_, c)| c)
            .collect();
    }
    match candidates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => bail!(
            "{} filter chains match equally: {:?}",
            many.len(),
            many.iter().map(|c| &c.name).collect::<Vec<_>>()
        ),
    }
}

/// The longest matching prefix length + 1 (0 when the chain names no ranges).
fn prefix_score(ranges: Option<&Value>, ip: Ipv4Addr) -> Result<Option<u32>> {
    let Some(ranges) = ranges.and_then(Value::as_array).filter(|r| !r.is_empty()) else {
        return Ok(Some(0));
    };
    let mut best = None;
    for r in ranges {
        let addr = r["addressPrefix"].as_str().context("addressPrefix")?;
        let len = u32::try_from(r["prefixLen"].as_u64().unwrap_or(0))?;
        let Ok(net) = addr.parse::<Ipv4Addr>() else {
            continue; // an IPv6 range never holds an IPv4 destination
        };
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - len.min(32))
        };
        if u32::from(net) & mask == u32::from(ip) & mask {
            best = best.max(Some(len + 1));
        }
    }
    Ok(best)
}

/// The attributes RBAC matchers read.
struct Ctx<'a> {
    req: &'a Request,
    headers: BTreeMap<String, String>,
    /// Dynamic metadata by filter name.
    metadata: Value,
}

/// What an RBAC filter refuses: `Some(description)` when it stops the request.
fn rbac_refuses(filter: &Value, ctx: &Ctx<'_>) -> Result<Option<String>> {
    let Some(rules) = filter.get("rules") else {
        return Ok(None);
    };
    let action = rules["action"].as_str().unwrap_or("ALLOW");
    let mut matched = None;
    for (name, policy) in rules["policies"].as_object().into_iter().flatten() {
        if policy_matches(policy, ctx).with_context(|| format!("policy {name}"))? {
            matched = Some(name.clone());
            break;
        }
    }
    Ok(match (action, matched) {
        ("ALLOW", None) => Some("rbac: no ALLOW policy matches".into()),
        ("ALLOW", Some(_)) | ("DENY", None) | ("LOG", _) => None,
        ("DENY", Some(name)) => Some(format!("rbac: DENY policy {name}")),
        (other, _) => bail!("RBAC action {other} is not modelled"),
    })
}

fn policy_matches(policy: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    for key in policy.as_object().into_iter().flatten().map(|(k, _)| k) {
        if key != "permissions" && key != "principals" {
            bail!("RBAC policy field {key} is not modelled");
        }
    }
    Ok(any_of(&policy["permissions"], &|p| permission(p, ctx))?
        && any_of(&policy["principals"], &|p| principal(p, ctx))?)
}

/// The single key of a oneof object.
fn oneof(v: &Value) -> Result<(&str, &Value)> {
    let obj = v.as_object().context("a oneof object")?;
    match obj.iter().collect::<Vec<_>>().as_slice() {
        [(k, v)] => Ok((k.as_str(), v)),
        _ => bail!("expected one field in {v}"),
    }
}

fn all_of(rules: &Value, f: &dyn Fn(&Value) -> Result<bool>) -> Result<bool> {
    for r in rules.as_array().into_iter().flatten() {
        if !f(r)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn any_of(rules: &Value, f: &dyn Fn(&Value) -> Result<bool>) -> Result<bool> {
    for r in rules.as_array().into_iter().flatten() {
        if f(r)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn permission(p: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    let (kind, v) = oneof(p)?;
    match kind {
        "any" => Ok(v.as_bool() == Some(true)),
        "andRules" => all_of(&v["rules"], &|r| permission(r, ctx)),
        "orRules" => any_of(&v["rules"], &|r| permission(r, ctx)),
        "notRule" => Ok(!permission(v, ctx)?),
        "destinationPort" => Ok(v.as_u64() == Some(u64::from(ctx.req.dest.1))),
        "destinationPortRange" => {
            let port = u64::from(ctx.req.dest.1);
            Ok(v["start"].as_u64().unwrap_or(0) <= port && port < v["end"].as_u64().unwrap_or(0))
        }
        "header" => header(v, ctx),
        "urlPath" => url_path(v, ctx),
        "metadata" => metadata(v, ctx),
        other => bail!("RBAC permission {other} is not modelled"),
    }
}

fn principal(p: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    let (kind, v) = oneof(p)?;
    match kind {
        "any" => Ok(v.as_bool() == Some(true)),
        "andIds" => all_of(&v["ids"], &|r| principal(r, ctx)),
        "orIds" => any_of(&v["ids"], &|r| principal(r, ctx)),
        "notId" => Ok(!principal(v, ctx)?),
        // Envoy matches the peer certificate's URI SAN; without a certificate, nothing matches
        // unless the principal name is absent (any authenticated connection).
        "authenticated" => match (&ctx.req.peer, v.get("principalName")) {
            (None, _) => Ok(false),
            (Some(_), None) => Ok(true),
            (Some(uri), Some(m)) => string_match(m, uri),
        },
        "header" => header(v, ctx),
        "urlPath" => url_path(v, ctx),
        "metadata" => metadata(v, ctx),
        other => bail!("RBAC principal {other} is not modelled"),
    }
}

fn header(h: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    let name = h["name"].as_str().context("header name")?;
    let value = ctx.headers.get(name);
    let invert = h["invertMatch"].as_bool() == Some(true);
    let mut matched = None;
    for (k, m) in h.as_object().into_iter().flatten() {
        matched = match k.as_str() {
            "name" | "invertMatch" => continue,
            "presentMatch" => Some(value.is_some() == (m.as_bool() == Some(true))),
            "stringMatch" => Some(match value {
                Some(v) => string_match(m, v)?,
                None => false,
            }),
            "exactMatch" | "prefixMatch" | "suffixMatch" | "containsMatch" => {
                let op = k.trim_end_matches("Match");
                Some(match value {
                    Some(v) => {
                        string_match(&Value::Object(Map::from_iter([(op.into(), m.clone())])), v)?
                    }
                    None => false,
                })
            }
            other => bail!("header matcher {other} is not modelled"),
        };
    }
    let matched = matched.context("a header matcher")?;
    // Envoy: a missing header matches nothing, also when inverted (except presence).
    if value.is_none() && h.get("presentMatch").is_none() {
        return Ok(false);
    }
    Ok(matched != invert)
}

fn url_path(v: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    let Some((_, path)) = &ctx.req.http else {
        return Ok(false);
    };
    // The path matcher ignores the query string.
    let path = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
    string_match(v.get("path").context("urlPath.path")?, path)
}

fn metadata(v: &Value, ctx: &Ctx<'_>) -> Result<bool> {
    let filter = v["filter"].as_str().context("metadata filter")?;
    let mut at = &ctx.metadata[filter];
    for seg in v["path"].as_array().into_iter().flatten() {
        at = &at[seg["key"].as_str().context("metadata path key")?];
    }
    let matched = value_match(&v["value"], at)?;
    Ok(matched != (v["invert"].as_bool() == Some(true)))
}

fn value_match(m: &Value, v: &Value) -> Result<bool> {
    let (kind, spec) = oneof(m)?;
    match kind {
        "presentMatch" => Ok(v.is_null() != (spec.as_bool() == Some(true))),
        "stringMatch" => match v.as_str() {
            Some(s) => string_match(spec, s),
            None => Ok(false),
        },
        "boolMatch" => Ok(v.as_bool().is_some() && v.as_bool() == spec.as_bool()),
        "listMatch" => {
            let inner = spec.get("oneOf").context("listMatch.oneOf")?;
            any_of(v, &|x| value_match(inner, x))
        }
        "orMatch" => any_of(&spec["valueMatchers"], &|x| value_match(x, v)),
        other => bail!("metadata value matcher {other} is not modelled"),
    }
}

/// Envoy's `StringMatcher`.
pub fn string_match(m: &Value, value: &str) -> Result<bool> {
    let ignore_case = m["ignoreCase"].as_bool() == Some(true);
    let fold = |s: &str| {
        if ignore_case {
            s.to_lowercase()
        } else {
            s.to_owned()
        }
    };
    let v = fold(value);
    let mut result = None;
    for (k, pat) in m.as_object().into_iter().flatten() {
        result = Some(match k.as_str() {
            "ignoreCase" => continue,
            "exact" => v == fold(pat.as_str().context("exact")?),
            "prefix" => v.starts_with(&fold(pat.as_str().context("prefix")?)),
            "suffix" => v.ends_with(&fold(pat.as_str().context("suffix")?)),
            "contains" => v.contains(&fold(pat.as_str().context("contains")?)),
            "safeRegex" => {
                let re = pat["regex"].as_str().context("safeRegex.regex")?;
                regex::Regex::new(&format!("^(?:{re})$"))
                    .with_context(|| format!("regex {re}"))?
                    .is_match(value)
            }
            other => bail!("string matcher {other} is not modelled"),
        });
    }
    result.context("an empty string matcher")
}

/// The JWT authentication filter: `Ok(Ok(Some(metadata)))` for a token its requirement accepts
/// (the metadata Istio's authn filter derives from it), `Ok(Ok(None))` for a request without a
/// token that the requirement lets through, `Ok(Err(why))` when the filter answers 401.
///
/// Every provider reads the `Authorization` header, so one token is seen by all of them. A
/// provider verifies it when the issuer is the provider's and the provider's keys hold the
/// token's (istiod inlines a JWKS it fetched, or a placeholder that verifies nothing when it
/// could not fetch one), and the token carries one of the provider's audiences, if it lists any.
/// Requirements: `providerName` needs a token that provider verifies;
/// `allowMissing` accepts a request without a token and a token some provider verifies;
/// `requiresAny` / `requiresAll` combine.
fn jwt_authn(filter: &Value, req: &Request) -> Result<std::result::Result<Option<Value>, String>> {
    let mut verifiers = BTreeMap::new();
    for (name, p) in filter["providers"].as_object().into_iter().flatten() {
        let verified = match &req.token {
            Some(jwt) if p["issuer"].as_str() == Some(jwt.issuer()) => {
                let inline = p["localJwks"]["inlineString"].as_str().with_context(|| {
                    format!("provider {name}: only inline keys are modelled: {p}")
                })?;
                let jwks: Value = serde_json::from_str(inline)
                    .with_context(|| format!("provider {name}: JWKS {inline}"))?;
                let key = jwks["keys"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kid"].as_str() == Some(jwt.key_id.as_str()));
                // A provider with audiences accepts a token carrying one of them.
                let wanted: Vec<&str> = p["audiences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let aud = &jwt.payload["aud"];
                let carried: Vec<&str> = match aud.as_array() {
                    Some(list) => list.iter().filter_map(Value::as_str).collect(),
                    None => aud.as_str().into_iter().collect(),
                };
                key && (wanted.is_empty() || carried.iter().any(|a| wanted.contains(a)))
            }
            _ => false,
        };
        verifiers.insert(name.as_str(), verified);
    }
    for rule in filter["rules"].as_array().into_iter().flatten() {
        if rule["match"] != serde_json::json!({"prefix": "/"}) {
            bail!("jwt_authn rule match {} is not modelled", rule["match"]);
        }
        let ok = requirement(&rule["requires"], &verifiers, req.token.is_some())?;
        if !ok {
            return Ok(Err(match &req.token {
                None => "a token is required".into(),
                Some(jwt) => format!("no provider verifies the token of {}", jwt.issuer()),
            }));
        }
    }
    if filter.get("requirementMap").is_some() {
        bail!("jwt_authn requirementMap is not modelled");
    }
    // The payload goes into dynamic metadata under the verifying provider's key, claims it
    // lists as space-delimited split into lists.
    let Some((jwt, provider)) = req.token.as_ref().and_then(|jwt| {
        let name = verifiers.iter().find(|(_, v)| **v).map(|(n, _)| *n)?;
        Some((jwt, &filter["providers"][name]))
    }) else {
        return Ok(Ok(None));
    };
    let key = provider["payloadInMetadata"]
        .as_str()
        .context("only providers with payloadInMetadata are modelled")?;
    let mut payload = jwt.payload.clone();
    for claim in provider["normalizePayloadInMetadata"]["spaceDelimitedClaims"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some(text) = payload[claim].as_str() {
            payload[claim] = text.split(' ').filter(|s| !s.is_empty()).collect();
        }
    }
    Ok(Ok(Some(serde_json::json!({
        "envoy.filters.http.jwt_authn": {key: payload}
    }))))
}

fn requirement(r: &Value, verifiers: &BTreeMap<&str, bool>, has_token: bool) -> Result<bool> {
    let (kind, v) = oneof(r)?;
    match kind {
        "providerName" => {
            let name = v.as_str().context("providerName")?;
            Ok(*verifiers
                .get(name)
                .with_context(|| format!("provider {name} is not defined"))?)
        }
        "allowMissing" => Ok(!has_token || verifiers.values().any(|x| *x)),
        "requiresAny" => any_of(&v["requirements"], &|x| {
            requirement(x, verifiers, has_token)
        }),
        "requiresAll" => all_of(&v["requirements"], &|x| {
            requirement(x, verifiers, has_token)
        }),
        other => bail!("jwt_authn requirement {other} is not modelled"),
    }
}
