# Token rules for Palisade's external authorizer (OPA behind Envoy ext_authz).
#
# The authorizer trusts nothing it did not check itself: Istio's ext_authz check does not carry
# what Envoy's JWT filter verified, so this policy verifies the token again (signature against
# the issuer's JWKS, issuer, audience, expiry and not-before) and reads it only where Envoy does
# (`Authorization: Bearer <token>`, the prefix as Envoy matches it). Then it adds the rules
# platform teams ask for and Istio cannot express:
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
	startswith(auth, "Bearer ")
}

# The issuer's keys: from jwksUri, else from the issuer's OpenID discovery document.
jwks_uri := config.jwksUri

jwks_uri := discovery.body.jwks_uri if {
	not config.jwksUri
	discovery := http.send({
		"method": "GET",
		"url": concat("", [trim_suffix(config.issuer, "/"), "/.well-known/openid-configuration"]),
		"force_cache": true,
		"force_cache_duration_seconds": 300,
		"raise_error": false,
	})
	discovery.status_code == 200
}

jwks := answer.raw_body if {
	answer := http.send({
		"method": "GET",
		"url": jwks_uri,
		"force_cache": true,
		"force_cache_duration_seconds": 300,
		"raise_error": false,
	})
	answer.status_code == 200
}

# What the token says before it is verified: only to pick the audience to verify it for.
unverified := payload if {
	[_, payload, _] := io.jwt.decode(bearer)
}

audiences_of(p) := {p.aud} if is_string(p.aud)

audiences_of(p) := {a | some a in p.aud} if is_array(p.aud)

audiences := object.get(config, "audiences", [])

audience_accepted(_) if count(audiences) == 0

audience_accepted(aud) if aud in audiences

verify_with := {"cert": jwks, "iss": config.issuer, "time": time.now_ns()}

# The claims of a token whose signature, issuer, expiry and not-before verify (and whose
# audience is one of the policy's, when it lists any).
claims := payload if {
	not unverified.aud
	count(audiences) == 0
	[valid, _, payload] := io.jwt.decode_verify(bearer, verify_with)
	valid
}

claims := payload if {
	some aud in audiences_of(unverified)
	audience_accepted(aud)
	[valid, _, payload] := io.jwt.decode_verify(bearer, object.union(verify_with, {"aud": aud}))
	valid
}

scopes contains s if {
	some s in split(claims.scope, " ")
	s != ""
}

deny contains "no bearer token" if not bearer

deny contains "the issuer's keys cannot be read" if {
	bearer
	not jwks
}

deny contains "the bearer token does not verify (signature, issuer, expiry or not-before)" if {
	bearer
	jwks
	not claims
}

deny contains msg if {
	count(audiences) > 0
	unverified
	count({a | some a in audiences_of(unverified); a in audiences}) == 0
	msg := sprintf("the token is for none of the audiences %v", [audiences])
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
