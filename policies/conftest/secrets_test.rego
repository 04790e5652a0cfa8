package palisade.conftest_test

import data.palisade.conftest
import rego.v1

deployment(env) := {
	"apiVersion": "apps/v1",
	"kind": "Deployment",
	"metadata": {"name": "web"},
	"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "r/a:1", "env": env}]}}},
}

test_a_secret_in_a_template_env_is_denied if {
	env := [{"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]
	some msg in conftest.deny with input as deployment(env)
	startswith(msg, "Deployment web: container \"app\": env DB_PASSWORD")
}

test_a_cronjob_init_container_is_read if {
	job := {
		"kind": "CronJob",
		"metadata": {"name": "nightly"},
		"spec": {"jobTemplate": {"spec": {"template": {"spec": {
			"containers": [{"name": "app"}],
			"initContainers": [{"name": "init", "envFrom": [{"secretRef": {"name": "all"}}]}],
		}}}}},
	}
	count(conftest.deny) == 1 with input as job
}

test_a_clean_deployment_and_other_kinds_pass if {
	count(conftest.deny) == 0 with input as deployment([{"name": "MODE", "value": "prod"}])
	count(conftest.deny) == 0 with input as {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}}
}

test_workloads_inside_a_list_are_read if {
	env := [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]
	list := {"apiVersion": "v1", "kind": "List", "items": [
		{"kind": "ConfigMap", "metadata": {"name": "c"}},
		deployment(env),
	]}
	count(conftest.deny) == 1 with input as list
}

test_nested_lists_typed_lists_and_unnamed_objects_are_read if {
	env := [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]
	nested := {"kind": "List", "items": [{"kind": "List", "items": [deployment(env)]}]}
	count(conftest.deny) == 1 with input as nested
	typed := {"kind": "DeploymentList", "items": [object.remove(deployment(env), ["kind"])]}
	count(conftest.deny) == 1 with input as typed
	job := {
		"kind": "Job",
		"metadata": {"generateName": "migrate-"},
		"spec": {"template": {"spec": {"containers": [{"name": "app", "env": env}]}}},
	}
	some msg in conftest.deny with input as job
	startswith(msg, "Job migrate-: ")
}
