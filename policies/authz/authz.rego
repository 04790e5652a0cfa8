# Token rules for Palisade's external authorizer (OPA behind Envoy ext_authz).
#
# Istio has already verified the token's signature, issuer and expiry (RequestAuthentication);
# this policy adds the rules platform teams ask for and Istio cannot express:
#   - access tokens carry only the allowed claims (sub, scope, exp, iat; iss/aud when validated),
#   - a token lives at most maxTokenLifetimeSeconds (exp - iat),
#   - each path requires its scopes.
# Configuration comes from data.palisade.config.authz, rendered by the operator from the AuthPolicy.
# Decision: data.palisade.authz.allow; data.palisade.authz.deny explains every refusal.
package palisade.authz

import rego.v1

default allow := false

allow if count(deny) == 0

config := data.palisade.config.authz

request := input.attributes.request.http

# The request path without its query string.
path := split(request.path, "?")[0]

bearer := substring(auth, 7, -1) if {
	auth := request.headers.authorization
	startswith(lower(auth), "bearer ")
}

claims := payload if {
	[_, payload, _] := io.jwt.decode(bearer)
}

scopes := {s | some s in split(claims.scope, " "); s != ""}

deny contains "no bearer token" if not bearer

deny contains "the bearer token is not a JWT" if {
	bearer
	not claims
}

deny contains msg if {
	some claim, _ in claims
	not claim in config.allowedClaims
	msg := sprintf("token carries claim %q; access tokens may carry only %v", [claim, config.allowedClaims])
}

deny contains msg if {
	some claim in ["exp", "iat"]
	value := object.get(claims, claim, null)
	not is_number(value)
	msg := sprintf("token has no numeric %q claim", [claim])
}

deny contains msg if {
	lifetime := claims.exp - claims.iat
	lifetime > config.maxTokenLifetimeSeconds
	msg := sprintf("token lifetime %ds exceeds the %ds maximum", [lifetime, config.maxTokenLifetimeSeconds])
}

deny contains msg if {
	some req in config.requiredScopes
	path_matches(req.path, path)
	method_matches(req.methods, request.method)
	some scope in req.scopes
	not scope in scopes
	msg := sprintf("%s %s requires scope %q", [request.method, path, scope])
}

# Paths as in AuthPolicy: exact, prefix*, *suffix, or *.
path_matches("*", _)

path_matches(pattern, p) if {
	endswith(pattern, "*")
	not startswith(pattern, "*")
	startswith(p, trim_suffix(pattern, "*"))
}

path_matches(pattern, p) if {
	startswith(pattern, "*")
	pattern != "*"
	endswith(p, trim_prefix(pattern, "*"))
}

path_matches(pattern, p) if {
	not contains(pattern, "*")
	pattern == p
}

method_matches(methods, _) if count(methods) == 0

method_matches(methods, m) if m in methods
