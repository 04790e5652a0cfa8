{{/* Common labels. */}}
{{- define "palisade.labels" -}}
app.kubernetes.io/name: palisade
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Selector labels of one component (operator or webhook). */}}
{{- define "palisade.selector" -}}
app.kubernetes.io/name: palisade
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference of one component: registry/repository, then @digest or :tag. */}}
{{- define "palisade.image" -}}
{{- $img := index .root.Values.image .component -}}
{{- $ref := printf "%s/%s" .root.Values.image.registry $img.repository -}}
{{- if $img.digest -}}
{{ $ref }}@{{ $img.digest }}
{{- else -}}
{{ $ref }}:{{ $img.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* Names. */}}
{{- define "palisade.operator" -}}{{ .Release.Name }}-operator{{- end }}
{{- define "palisade.webhook" -}}{{ .Release.Name }}-webhook{{- end }}
{{- define "palisade.tlsSecret" -}}{{ .Release.Name }}-webhook-tls{{- end }}

{{/* The restricted container security context every Palisade container runs with. */}}
{{- define "palisade.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Namespaces the webhook exempts: the configured ones and the release namespace. */}}
{{- define "palisade.exempt" -}}
{{- $list := concat (list .Release.Namespace) .Values.webhook.exemptNamespaces | uniq -}}
{{- toJson $list -}}
{{- end }}

{{/* A Namespace request that sets, changes or removes palisade.dev/enforcement, or creates an
exempt namespace. */}}
{{- define "palisade.enforcementLabelChanges" -}}
{{- $k := "'palisade.dev/enforcement'" -}}
(request.operation == 'CREATE' && object.metadata.name in {{ include "palisade.exempt" . }}) || (has(object.metadata.labels) && {{ $k }} in object.metadata.labels ? object.metadata.labels[{{ $k }}] : '<none>') != (oldObject != null && has(oldObject.metadata.labels) && {{ $k }} in oldObject.metadata.labels ? oldObject.metadata.labels[{{ $k }}] : '<none>')
{{- end }}

{{/* Egress every Palisade pod needs: DNS, and the API server's endpoints. */}}
{{- define "palisade.baseEgress" -}}
- ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
- to:
    {{- range .apiServerCIDRs }}
    - ipBlock: {cidr: {{ . }}}
    {{- end }}
  ports:
    {{- range .egress.apiServerPorts }}
    - {port: {{ . }}, protocol: TCP}
    {{- end }}
{{- end }}

{{/*
The match condition that sends a status update to the webhook only when it changes what selects
the pod's identity: its labels, or Istio's injection annotations (not, say, the annotation Istio's
CNI agent writes through pods/status on every ambient pod).
*/}}
{{- define "palisade.statusRelabels" -}}
!has(request.subResource) || request.subResource != 'status' || has(object.metadata.labels) != has(oldObject.metadata.labels) || (has(object.metadata.labels) && object.metadata.labels != oldObject.metadata.labels) || ['sidecar.istio.io/inject', 'sidecar.istio.io/status'].exists(k, (has(object.metadata.annotations) && k in object.metadata.annotations) != (has(oldObject.metadata.annotations) && k in oldObject.metadata.annotations) || (has(object.metadata.annotations) && k in object.metadata.annotations && object.metadata.annotations[k] != oldObject.metadata.annotations[k]))
{{- end }}

{{/* Labels and annotations of the chart's CRDs (indented under metadata). */}}
{{- define "palisade.crdMetadata" }}
  labels:
    {{- include "palisade.labels" . | nindent 4 }}
{{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{/* Non-empty when the ImagePolicy kind can be applied with this release: its CRD is served
already, or the chart does not install it (then it was applied before the chart). On a first
install that brings the CRDs, Helm cannot map an ImagePolicy before they exist: NOTES.txt says
to upgrade once. */}}
{{- define "palisade.imagePolicyServed" -}}
{{- if or (not .Values.crds.enabled) (.Capabilities.APIVersions.Has "palisade.dev/v1alpha1/ImagePolicy") -}}
served
{{- end -}}
{{- end }}
