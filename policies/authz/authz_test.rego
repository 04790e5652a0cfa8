package palisade.authz_test

import rego.v1

import data.palisade.authz

cfg := {
	"issuer": "https://auth.example.com",
	"audiences": ["orders"],
	"jwksUri": "https://auth.example.com/jwks",
	"maxTokenLifetimeSeconds": 900,
	"allowedClaims": ["sub", "scope", "exp", "iat", "iss", "aud"],
	"requiredScopes": [
		{"path": "/api/orders", "methods": ["POST"], "scopes": ["orders:write"]},
		{"path": "/api/orders/*", "methods": ["GET"], "scopes": ["orders:read"]},
		{"path": "*.csv", "methods": [], "scopes": ["reports:read"]},
	],
}

# The issuer's signing key (test only), and a key of someone else's.
key := {"kty": "EC", "crv": "P-256", "x": "1YGkqphAiAJVIwd2CavxALU_daDLYeiTXjs5Jdo_I24", "y": "McZn1DEBIY5aw_HpI0W3yNYoYOfEH3ObDD-oDWFk1O0", "d": "nTeUrM38vdVBP5nPxeli5dahawk4bSBGws-Kfp6H2HY", "kid": "good"}

other_key := {"kty": "EC", "crv": "P-256", "x": "jW2UjZFtd_t8VPMvRRjfi_g_ItiRUnSrMpfnm1fF8wg", "y": "8p9uV_iq6R8mfV8lu-wZzKU2eJZ9m1w7vgRyQNigkZ8", "d": "wmlxb6iMgqwMuSegMaJ5041qH867fu9avcNsHm_eGbc", "kid": "evil"}

# The issuer's JWKS, as its jwksUri serves it.
jwks_answer(request) := {"status_code": 200, "raw_body": json.marshal({"keys": [object.remove(key, ["d"])]})} if {
	request.url == "https://auth.example.com/jwks"
}

token_by(k, claims) := io.jwt.encode_sign({"alg": "ES256", "typ": "JWT", "kid": k.kid}, claims, k)

token(claims) := token_by(key, claims)

header_req(method, path, authorization) := {"attributes": {"request": {"http": {
	"method": method,
	"path": path,
	"headers": {"authorization": authorization},
}}}}

req(method, path, claims) := header_req(method, path, concat(" ", ["Bearer", token(claims)]))

# Tokens are checked at this time (seconds 1000 to 1600 are their validity).
now := 1200 * 1000000000

good := {"sub": "alice", "scope": "orders:read orders:write", "iat": 1000, "exp": 1600, "iss": "https://auth.example.com", "aud": "orders"}

allowed(r) if {
	authz.allow with input as r with data.palisade.config.authz as cfg with http.send as jwks_answer with time.now_ns as now
}

denials(r) := d if {
	d := authz.deny with input as r with data.palisade.config.authz as cfg with http.send as jwks_answer with time.now_ns as now
}

no_keys(_) := {"status_code": 503, "raw_body": ""}

test_allows_a_short_lived_minimal_token_with_scope if {
	allowed(req("GET", "/api/orders/42?x=1", good))
}

test_refuses_missing_token if {
	r := {"attributes": {"request": {"http": {"method": "GET", "path": "/api/orders/1", "headers": {}}}}}
	not allowed(r)
	denials(r)["no bearer token"]
}

test_refuses_a_token_that_is_not_a_jwt if {
	r := {"attributes": {"request": {"http": {"method": "GET", "path": "/", "headers": {"authorization": "Bearer abc"}}}}}
	not allowed(r)
}

test_refuses_extra_claims if {
	claims := object.union(good, {"email": "alice@example.com"})
	d := denials(req("GET", "/api/orders/1", claims))
	some msg in d
	contains(msg, `claim "email"`)
}

test_refuses_long_lived_tokens if {
	claims := object.union(good, {"exp": 1000 + 3600})
	d := denials(req("GET", "/api/orders/1", claims))
	d["token lifetime 3600s exceeds the 900s maximum"]
}

test_accepts_exactly_the_maximum_lifetime if {
	claims := object.union(good, {"exp": 1900})
	allowed(req("GET", "/api/orders/1", claims))
}

test_refuses_tokens_without_exp if {
	claims := object.remove(good, ["exp"])
	d := denials(req("GET", "/api/orders/1", claims))
	d["token has no numeric \"exp\" claim"]
}

test_requires_the_scope_of_the_path_and_method if {
	claims := object.union(good, {"scope": "orders:read"})
	d := denials(req("POST", "/api/orders", claims))
	d["POST /api/orders requires scope \"orders:write\""]
	allowed(req("GET", "/api/orders/7", claims))
}

test_suffix_paths_and_any_method if {
	d := denials(req("DELETE", "/exports/q3.csv", good))
	d["DELETE /exports/q3.csv requires scope \"reports:read\""]
}

test_prefix_does_not_match_a_sibling if {
	# /api/orders/* requires orders:read on GET; /api/ordersX is a different path.
	claims := object.union(good, {"scope": ""})
	allowed(req("GET", "/api/ordersX", claims))
}

test_refuses_a_lower_case_bearer_prefix_envoy_does_not_extract if {
	not allowed(header_req("GET", "/api/orders/1", concat(" ", ["bearer", token(good)])))
	denials(header_req("GET", "/api/orders/1", concat(" ", ["bearer", token(good)])))["no bearer token"]
}

test_refuses_a_token_signed_by_another_key if {
	r := header_req("GET", "/api/orders/1", concat(" ", ["Bearer", token_by(other_key, good)]))
	not allowed(r)
	denials(r)["the bearer token does not verify (signature, issuer, expiry or not-before)"]
}

test_refuses_an_unsigned_token if {
	unsigned := concat(".", [base64url.encode_no_pad(`{"alg":"none","typ":"JWT"}`), base64url.encode_no_pad(json.marshal(good)), ""])
	not allowed(header_req("GET", "/api/orders/1", concat(" ", ["Bearer", unsigned])))
}

test_refuses_a_token_of_another_issuer if {
	not allowed(req("GET", "/api/orders/1", object.union(good, {"iss": "https://evil.example.com"})))
}

test_refuses_a_token_for_another_audience if {
	d := denials(req("GET", "/api/orders/1", object.union(good, {"aud": "payments"})))
	d["the token is for none of the audiences [\"orders\"]"]
}

test_refuses_an_expired_token if {
	r := req("GET", "/api/orders/1", good)
	expired := 1700 * 1000000000
	not authz.allow with input as r with data.palisade.config.authz as cfg with http.send as jwks_answer with time.now_ns as expired
}

test_refuses_when_the_keys_cannot_be_read if {
	r := req("GET", "/api/orders/1", good)
	d := authz.deny with input as r with data.palisade.config.authz as cfg with http.send as no_keys with time.now_ns as now
	d["the issuer's keys cannot be read"]
}
