# METADATA
# title: Palisade's secrets check on rendered manifests
# description: |
#   conftest runs Palisade's own admission policy (palisade.admission.secrets) on manifests
#   before they reach a cluster: a Helm chart's rendered output, a GitOps repository. Each
#   object with a pod or pod template (Pods and the workload kinds) becomes the policy's input,
#   with every container (init, regular, ephemeral) as the webhook reads them.
#   Use: conftest test --policy policies --namespace palisade.conftest <manifests>
package palisade.conftest

import data.palisade.admission.secrets
import rego.v1

# Where each kind keeps its pod spec.
pod_spec_path := {
	"Pod": ["spec"],
	"Deployment": ["spec", "template", "spec"],
	"ReplicaSet": ["spec", "template", "spec"],
	"StatefulSet": ["spec", "template", "spec"],
	"DaemonSet": ["spec", "template", "spec"],
	"Job": ["spec", "template", "spec"],
	"CronJob": ["spec", "jobTemplate", "spec", "template", "spec"],
}

# Every object of the input with a pod (template): the input itself, the items of Lists at any
# depth, and the items of typed lists (`DeploymentList`), which carry no kind of their own.
objects contains obj if {
	walk(input, [_, obj])
	is_object(obj)
	pod_spec_path[obj.kind]
}

objects contains object.union(item, {"kind": kind}) if {
	walk(input, [_, list])
	is_object(list)
	endswith(list.kind, "List")
	kind := trim_suffix(list.kind, "List")
	pod_spec_path[kind]
	some item in list.items
	not item.kind
}

# How an object is named in a message: its name, else its generateName, else so.
name_of(obj) := object.get(obj.metadata, "name", object.get(obj.metadata, "generateName", "(unnamed)")) if {
	is_object(obj.metadata)
} else := "(unnamed)"

pod_spec(obj, paths) := object.get(obj, paths[obj.kind], {})

containers(spec) := [c |
	some field in ["initContainers", "containers", "ephemeralContainers"]
	some i, k in object.get(spec, field, [])
	c := {
		"field": field,
		"index": i,
		"name": object.get(k, "name", sprintf("#%d", [i])),
		"env": object.get(k, "env", []),
		"envFrom": object.get(k, "envFrom", []),
	}
]

# METADATA
# entrypoint: true
deny contains msg if {
	some obj in objects
	pod := {"containers": containers(pod_spec(obj, pod_spec_path))}

	# regal ignore:with-outside-test-context
	some finding in secrets.deny with input as pod
	msg := sprintf("%s %s: %s", [obj.kind, name_of(obj), finding.message])
}
