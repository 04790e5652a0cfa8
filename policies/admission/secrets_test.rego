package palisade.admission.secrets_test

import rego.v1

import data.palisade.admission.secrets

pod(containers) := {"containers": containers}

container(env) := {"field": "containers", "index": 0, "name": "app", "env": env, "envFrom": []}

rules(input_pod) := {f.rule | some f in secrets.deny with input as input_pod}

test_clean_pod_has_no_findings if {
	count(secrets.deny) == 0 with input as pod([container([{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}])])
}

test_secret_key_ref_is_denied if {
	rules(pod([container([{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}])])) == {"env-from-secret"}
}

test_config_map_ref_is_allowed if {
	count(secrets.deny) == 0 with input as pod([container([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x"}}}])])
}

test_env_from_secret_is_denied_and_config_map_allowed if {
	c := object.union(container([]), {"envFrom": [{"secretRef": {"name": "all"}}, {"configMapRef": {"name": "cfg"}}]})
	rules(pod([c])) == {"envfrom-secret"}
}

test_literal_secret_shapes if {
	values := {
		"private-key": "-----BEGIN RSA PRIVATE KEY-----\nMIIE",
		"aws-access-key": "AKIAIOSFODNN7EXAMPLE",
		"github-token": "ghp_0123456789abcdefghijABCDEFGHIJ0123456789",
		"gitlab-token": "glpat-abcdefghij0123456789",
		"slack-token": "xoxb-1234567890-abcdef",
		"stripe-live-key": "sk_live_0123456789abcdefABCD",
		"google-api-key": "AIzaSyA0123456789abcdefghijklmnopqrstuv",
		"jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXZhbHVl",
	}
	every rule, value in values {
		rules(pod([container([{"name": "V", "value": value}])])) == {rule}
	}
}

test_near_misses_are_allowed if {
	values := ["AKIA-not-a-key", "ghp_short", "eyJ.not.jwt", "public key: -----BEGIN PUBLIC KEY-----", "sk_test_0123456789abcdefABCD"]
	every value in values {
		count(secrets.deny) == 0 with input as pod([container([{"name": "V", "value": value}])])
	}
}

test_findings_name_the_container_and_never_the_value if {
	c := {"field": "ephemeralContainers", "index": 0, "name": "debug", "env": [{"name": "TOKEN", "value": "AKIAIOSFODNN7EXAMPLE"}], "envFrom": []}
	some f in secrets.deny with input as pod([c])
	f.container == "debug"
	f.field == "ephemeralContainers"
	not contains(f.message, "AKIAIOSFODNN7EXAMPLE")
	contains(f.message, "TOKEN")
}
