package palisade.authz_test

import rego.v1

import data.palisade.authz

cfg := {
	"maxTokenLifetimeSeconds": 900,
	"allowedClaims": ["sub", "scope", "exp", "iat", "iss"],
	"requiredScopes": [
		{"path": "/api/orders", "methods": ["POST"], "scopes": ["orders:write"]},
		{"path": "/api/orders/*", "methods": ["GET"], "scopes": ["orders:read"]},
		{"path": "*.csv", "methods": [], "scopes": ["reports:read"]},
	],
}

key := {"kty": "oct", "k": "cGFsaXNhZGUtdGVzdC1rZXk"}

token(claims) := io.jwt.encode_sign({"alg": "HS256", "typ": "JWT"}, claims, key)

req(method, path, claims) := {"attributes": {"request": {"http": {
	"method": method,
	"path": path,
	"headers": {"authorization": concat(" ", ["Bearer", token(claims)])},
}}}}

good := {"sub": "alice", "scope": "orders:read orders:write", "iat": 1000, "exp": 1600, "iss": "https://auth.example.com"}

test_allows_a_short_lived_minimal_token_with_scope if {
	authz.allow with input as req("GET", "/api/orders/42?x=1", good) with data.palisade.config.authz as cfg
}

test_refuses_missing_token if {
	r := {"attributes": {"request": {"http": {"method": "GET", "path": "/api/orders/1", "headers": {}}}}}
	not authz.allow with input as r with data.palisade.config.authz as cfg
	authz.deny["no bearer token"] with input as r with data.palisade.config.authz as cfg
}

test_refuses_a_token_that_is_not_a_jwt if {
	r := {"attributes": {"request": {"http": {"method": "GET", "path": "/", "headers": {"authorization": "Bearer abc"}}}}}
	not authz.allow with input as r with data.palisade.config.authz as cfg
}

test_refuses_extra_claims if {
	claims := object.union(good, {"email": "alice@example.com"})
	d := authz.deny with input as req("GET", "/api/orders/1", claims) with data.palisade.config.authz as cfg
	some msg in d
	contains(msg, `claim "email"`)
}

test_refuses_long_lived_tokens if {
	claims := object.union(good, {"exp": 1000 + 3600})
	d := authz.deny with input as req("GET", "/api/orders/1", claims) with data.palisade.config.authz as cfg
	d["token lifetime 3600s exceeds the 900s maximum"]
}

test_accepts_exactly_the_maximum_lifetime if {
	claims := object.union(good, {"exp": 1900})
	authz.allow with input as req("GET", "/api/orders/1", claims) with data.palisade.config.authz as cfg
}

test_refuses_tokens_without_exp if {
	claims := object.remove(good, ["exp"])
	d := authz.deny with input as req("GET", "/api/orders/1", claims) with data.palisade.config.authz as cfg
	d["token has no numeric \"exp\" claim"]
}

test_requires_the_scope_of_the_path_and_method if {
	claims := object.union(good, {"scope": "orders:read"})
	d := authz.deny with input as req("POST", "/api/orders", claims) with data.palisade.config.authz as cfg
	d["POST /api/orders requires scope \"orders:write\""]
	authz.allow with input as req("GET", "/api/orders/7", claims) with data.palisade.config.authz as cfg
}

test_suffix_paths_and_any_method if {
	d := authz.deny with input as req("DELETE", "/exports/q3.csv", good) with data.palisade.config.authz as cfg
	d["DELETE /exports/q3.csv requires scope \"reports:read\""]
}

test_prefix_does_not_match_a_sibling if {
	# /api/orders/* requires orders:read on GET; /api/ordersX is a different path.
	claims := object.union(good, {"scope": ""})
	authz.allow with input as req("GET", "/api/ordersX", claims) with data.palisade.config.authz as cfg
}
