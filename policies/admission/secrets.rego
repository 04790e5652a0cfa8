# No secrets in environment variables.
#
# Environment variables leak: into crash dumps, child processes, `kubectl describe`, logs of
# tools that print their environment. Secrets belong in files or in Vault (SecretBinding).
# Input: {"containers": [{"field", "index", "name", "env", "envFrom"}]} — every container of the
# pod: init, regular and ephemeral. Output: the set `deny` of findings
# {"container", "field", "rule", "message"}; a finding never contains the secret itself.
package palisade.admission.secrets

import rego.v1

# Literal values that are secrets by their shape.
patterns := {
	"private-key": `-----BEGIN ([A-Z]+ )?PRIVATE KEY-----`,
	"aws-access-key": `\b(AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b`,
	"github-token": `\bgh[pousr]_[A-Za-z0-9]{36,}\b`,
	"gitlab-token": `\bglpat-[A-Za-z0-9_-]{20,}\b`,
	"slack-token": `\bxox[abprs]-[A-Za-z0-9-]{10,}\b`,
	"stripe-live-key": `\b[sr]k_live_[A-Za-z0-9]{16,}\b`,
	"google-api-key": `\bAIza[0-9A-Za-z_-]{35}\b`,
	"jwt": `\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}`,
}

# Every pattern in one expression: a value that matches none of them (nearly every value) costs a
# single match instead of one per pattern.
any_pattern := concat("|", [sprintf("(?:%s)", [p]) | some p in patterns])

deny contains finding if {
	some c in input.containers
	some e in c.env
	ref := e.valueFrom.secretKeyRef
	finding := {
		"container": c.name,
		"field": c.field,
		"rule": "env-from-secret",
		"message": sprintf(
			"container %q: env %s takes key %q of Secret %q; mount the Secret as a file or read it from Vault with a SecretBinding",
			[c.name, e.name, ref.key, ref.name],
		),
	}
}

deny contains finding if {
	some c in input.containers
	some src in c.envFrom
	ref := src.secretRef
	finding := {
		"container": c.name,
		"field": c.field,
		"rule": "envfrom-secret",
		"message": sprintf(
			"container %q: envFrom imports every key of Secret %q as environment variables; mount it as a file instead",
			[c.name, ref.name],
		),
	}
}

deny contains finding if {
	some c in input.containers
	some e in c.env
	is_string(e.value)

	# Every pattern needs at least 15 characters: shorter values skip the regular expressions.
	count(e.value) >= 15
	regex.match(any_pattern, e.value)
	some rule, pattern in patterns
	regex.match(pattern, e.value)
	finding := {
		"container": c.name,
		"field": c.field,
		"rule": rule,
		"message": sprintf(
			"container %q: env %s holds a literal secret (%s); remove it, rotate it, and read it from a file or Vault",
			[c.name, e.name, rule],
		),
	}
}
