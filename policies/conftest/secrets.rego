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

# The objects of the input: a List's items, or the object itself.
objects := input.items if endswith(input.kind, "List")

else := [input]

pod_spec(obj, paths) := object.get(obj, paths[obj.kind], {})

containers(spec) := [c |
	some field in ["initContainers", "containers", "ephemeralContainers"]
	some i, k in object.get(spec, field, [])
	c := {
		"field": field,
		"index": i,
		"name": k.name,
		"env": object.get(k, "env", []),
		"envFrom": object.get(k, "envFrom", []),
	}
]

# METADATA
# entrypoint: true
deny contains msg if {
	some obj in objects
	pod_spec_path[obj.kind]
	pod := {"containers": containers(pod_spec(obj, pod_spec_path))}

	# regal ignore:with-outside-test-context
	some finding in secrets.deny with input as pod
	msg := sprintf("%s %s: %s", [obj.kind, obj.metadata.name, finding.message])
}
