{{/* The release's base name: the release name, or <release>-trellis. */}}
{{- define "trellis.fullname" -}}
{{- if contains "trellis" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-trellis" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trellis.controller" -}}{{ include "trellis.fullname" . }}-controller{{- end -}}
{{- define "trellis.gateway" -}}{{ include "trellis.fullname" . }}-gateway{{- end -}}
{{- define "trellis.dns" -}}{{ include "trellis.fullname" . }}-dns{{- end -}}
{{- define "trellis.peering" -}}{{ include "trellis.fullname" . }}-peering{{- end -}}
{{/*
The ConfigMap the controller keeps its last state in (it creates it: stateConfigMap). Named so
that the controller's tests, which read rbac.yaml raw and turn `include "trellis.X"` into
trellis-X, see its real name.
*/}}
{{- define "trellis.controller-state" -}}{{ include "trellis.fullname" . }}-controller-state{{- end -}}

{{/*
A component's ServiceAccount: its serviceAccount.name, or the component's own name (also when
serviceAccount.create is false: the account you made under the chart's name).
(dict "root" $ "component" "gateway")
*/}}
{{- define "trellis.serviceAccountName" -}}
{{- $values := index .root.Values .component -}}
{{- $values.serviceAccount.name | default (include (printf "trellis.%s" .component) .root) -}}
{{- end -}}
{{- define "trellis.controllerServiceAccount" -}}{{ include "trellis.serviceAccountName" (dict "root" . "component" "controller") }}{{- end -}}
{{- define "trellis.gatewayServiceAccount" -}}{{ include "trellis.serviceAccountName" (dict "root" . "component" "gateway") }}{{- end -}}
{{- define "trellis.dnsServiceAccount" -}}{{ include "trellis.serviceAccountName" (dict "root" . "component" "dns") }}{{- end -}}
{{/* Deprecated: the Secret holding the plaintext agent token (agent.legacyToken). */}}
{{- define "trellis.agentSecret" -}}
{{- .Values.agent.legacyToken.existingSecret | default (printf "%s-agent-token" (include "trellis.fullname" .)) -}}
{{- end -}}
{{/* The Secret holding the agent CA (ca.pem, ca-key.pem): the user's, or the chart's. */}}
{{- define "trellis.agentCaSecret" -}}
{{- .Values.agent.tls.secretName | default (printf "%s-agent-ca" (include "trellis.fullname" .)) -}}
{{- end -}}

{{/*
The controller's agent address as the gateways and DNS see it: the controller Service's
ClusterIP and agent port, from the environment Kubernetes gives every pod for the Services of
its namespace ($(VAR) is expanded by the kubelet). The gateways run on the host network before
cluster DNS works, and their flags take IP:port, so no name is resolved.
*/}}
{{- define "trellis.agentAddress" -}}
{{- $env := include "trellis.controller" . | upper | replace "-" "_" -}}
$({{ $env }}_SERVICE_HOST):$({{ $env }}_SERVICE_PORT_AGENT)
{{- end -}}

{{/* The image: repository@digest when a digest is given (the tag is then ignored). */}}
{{- define "trellis.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* Labels of every object; those of a component add "trellis.selector". */}}
{{- define "trellis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: trellis
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* Labels of an object that belongs to no one component. */}}
{{- define "trellis.releaseLabels" -}}
{{ include "trellis.labels" . }}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "controller"). */}}
{{- define "trellis.selector" -}}
app.kubernetes.io/name: trellis
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
The controller pods' selector labels as a label selector string (key=value,...): the pods the
leader looks at when it moves the leader label (leaderElection.podSelector).
*/}}
{{- define "trellis.controllerPodSelector" -}}
{{- $labels := include "trellis.selector" (dict "root" . "component" "controller") | fromYaml -}}
{{- $terms := list -}}
{{- range $key := keys $labels | sortAlpha -}}
{{- $terms = append $terms (printf "%s=%s" $key (index $labels $key)) -}}
{{- end -}}
{{- join "," $terms -}}
{{- end -}}

{{/*
The selector of the Services that must reach the leader alone: the controller's selector
labels and the label the leader puts on its own pod (and takes off every other). Readiness is
not leadership: a follower is Ready too, so rollouts and drains work, but carries no label.
*/}}
{{- define "trellis.controllerLeaderSelector" -}}
{{ include "trellis.selector" (dict "root" . "component" "controller") }}
trellis.dev/controller-leader: "true"
{{- end -}}

{{/*
A pod template's labels: the user's podLabels, then the chart's, which win (the selector must
keep matching). (dict "root" $ "component" "dns")
*/}}
{{- define "trellis.podLabels" -}}
{{- $chart := merge (include "trellis.labels" .root | fromYaml) (include "trellis.selector" . | fromYaml) -}}
{{- toYaml (merge $chart (deepCopy ((index .root.Values .component).podLabels | default dict))) -}}
{{- end -}}

{{/*
A pod template's annotations: the user's podAnnotations under the chart's own (the config
checksum, the Prometheus ones), which win. Empty when there are none.
(dict "root" $ "component" "controller" "port" 9464 "chart" (dict ...))
*/}}
{{- define "trellis.podAnnotations" -}}
{{- $chart := merge (deepCopy (.chart | default dict)) (include "trellis.scrapeAnnotations" . | fromYaml | default dict) -}}
{{- $all := merge $chart (deepCopy ((index .root.Values .component).podAnnotations | default dict)) -}}
{{- with $all }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/*
A Deployment's strategy or a DaemonSet's updateStrategy: rollingUpdate only with type
RollingUpdate (the API server refuses it beside Recreate or OnDelete). Takes the value.
*/}}
{{- define "trellis.strategy" -}}
type: {{ .type }}
{{- if and (eq .type "RollingUpdate") .rollingUpdate }}
rollingUpdate:
  {{- toYaml .rollingUpdate | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The PodDisruptionBudget of a Deployment's pods, when enabled and it has more than one replica
(with one, a budget would block every drain of its node). (dict "root" $ "component" "dns")
*/}}
{{- define "trellis.podDisruptionBudget" -}}
{{- $values := index .root.Values .component -}}
{{- $pdb := $values.podDisruptionBudget -}}
{{- if and $pdb.enabled (gt (int $values.replicas) 1) }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include (printf "trellis.%s" .component) .root }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "trellis.labels" .root | nindent 4 }}
    {{- include "trellis.selector" . | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $pdb.minAvailable) }}
  minAvailable: {{ $pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ $pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "trellis.selector" . | nindent 6 }}
  # A pod that is not Ready (crashing, or still starting) never blocks a drain.
  unhealthyPodEvictionPolicy: AlwaysAllow
{{- end }}
{{- end -}}

{{/* Pod annotations for Prometheus' kubernetes_sd: (dict "root" $ "port" 9464). */}}
{{- define "trellis.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/*
The controller's configuration file (mesh-controller/src/config.rs). Rendered with
"nodeEncryption" given so the Deployment's checksum can leave the runtime switch out:
(dict "root" $ "nodeEncryption" true).
*/}}
{{- define "trellis.controllerConfig" -}}
{{- $v := .root.Values -}}
{{- with $v.cluster.id }}
clusterId: {{ . }}
{{- end }}
{{- with $v.cluster.name }}
clusterName: {{ . | quote }}
{{- end }}
listen: 0.0.0.0:{{ $v.peering.port }}
{{- with $v.cluster.serviceCIDRs }}
serviceCidrs: {{ toJson . }}
{{- end }}
peers:
{{- range $v.peers }}
  - id: {{ .id }}
    {{- with .endpoint }}
    endpoint: {{ . | quote }}
    {{- end }}
    {{- if hasKey . "podCIDRs" }}
    podCIDRs: {{ toJson .podCIDRs }}
    {{- end }}
    {{- if hasKey . "serviceCIDRs" }}
    serviceCIDRs: {{ toJson .serviceCIDRs }}
    {{- end }}
{{- else }} []
{{- end }}
peerLimits:
  nodes: {{ int $v.peering.limits.nodes }}
  services: {{ int $v.peering.limits.services }}
  endpoints: {{ int $v.peering.limits.endpoints }}
  pods: {{ int $v.peering.limits.pods }}
  identities: {{ int $v.peering.limits.identities }}
networkPolicy: {{ $v.networkPolicy.enabled }}
# Relays every node's flows on a loopback listener: kubectl port-forward reaches it, so
# Kubernetes RBAC (pods/portforward) decides who sees them.
flows:
  enabled: {{ $v.flows.enabled }}
  listen: {{ $v.flows.listen | quote }}
leaseSeconds: {{ $v.peering.leaseSeconds }}
heartbeatSeconds: {{ $v.peering.heartbeatSeconds }}
nodeEncryption: {{ .nodeEncryption }}
tls:
  ca: /etc/trellis/tls/ca.crt
  cert: /etc/trellis/tls/tls.crt
  key: /etc/trellis/tls/tls.key
source:
  kubernetes:
    settingsNamespace: {{ .root.Release.Namespace }}
    settingsConfigMap: {{ include "trellis.controller" .root }}
metricsListen: 0.0.0.0:{{ $v.controller.metricsPort }}
agentListen: 0.0.0.0:{{ $v.agent.port }}
{{- if $v.agent.legacyToken.enabled }}
agentTokenFile: /etc/trellis/agent/token
{{- else }}
# The controller issues its own agent.<cluster>.trellis from the CA key into stateFile's
# directory (no cert/key here): the chart need not know the cluster's ID.
agentTls:
  ca: /etc/trellis/agent-ca/ca.pem
nodeBootstrap:
  caKey: /etc/trellis/agent-ca/ca-key.pem
  serviceAccount: {{ .root.Release.Namespace }}/{{ include "trellis.gatewayServiceAccount" .root }}
  {{- if $v.dns.enabled }}
  dnsServiceAccount: {{ .root.Release.Namespace }}/{{ include "trellis.dnsServiceAccount" .root }}
  {{- end }}
{{- end }}
# One replica leads (Lease {{ include "trellis.controller" .root }}); the others follow, serving
# only metrics, until it stops renewing. The holder is the pod (POD_NAME). The leader labels
# its pod trellis.dev/controller-leader=true and unlabels the other pods podSelector finds (in
# POD_NAMESPACE): the agent, status and peering Services select that label.
leaderElection:
  lease: {{ include "trellis.controller" .root }}
  namespace: {{ .root.Release.Namespace }}
  podSelector: {{ include "trellis.controllerPodSelector" .root | quote }}
  leaseDurationSeconds: {{ int $v.controller.leaderElection.leaseDurationSeconds }}
  renewDeadlineSeconds: {{ int $v.controller.leaderElection.renewDeadlineSeconds }}
  retryPeriodSeconds: {{ int $v.controller.leaderElection.retryPeriodSeconds }}
# The last state survives rescheduling in this ConfigMap (the leader creates it). stateFile's
# directory, an emptyDir, holds the agent certificate the controller issues itself.
stateConfigMap: {{ include "trellis.controller-state" .root }}
stateFile: /var/lib/trellis/controller-state.json
{{- end -}}

{{/* What the schema cannot say; fails the render with the reason. */}}
{{- define "trellis.validate" -}}
{{- $v := .Values -}}
{{- if lt (int $v.peering.leaseSeconds) (mul 2 (int $v.peering.heartbeatSeconds)) -}}
{{- fail (printf "peering.leaseSeconds (%v) must be at least twice peering.heartbeatSeconds (%v)" $v.peering.leaseSeconds $v.peering.heartbeatSeconds) -}}
{{- end -}}
{{- if and $v.agent.tls.secretName $v.agent.legacyToken.enabled -}}
{{- fail "agent.tls.secretName and agent.legacyToken.enabled exclude each other: the deprecated token mode has no TLS" -}}
{{- end -}}
{{- $election := $v.controller.leaderElection -}}
{{- if not (and (gt (int $election.leaseDurationSeconds) (int $election.renewDeadlineSeconds)) (gt (int $election.renewDeadlineSeconds) (int $election.retryPeriodSeconds))) -}}
{{- fail (printf "controller.leaderElection: leaseDurationSeconds (%v) must exceed renewDeadlineSeconds (%v), which must exceed retryPeriodSeconds (%v)" $election.leaseDurationSeconds $election.renewDeadlineSeconds $election.retryPeriodSeconds) -}}
{{- end -}}
{{- range $component := list "controller" "dns" -}}
{{- $values := index $v $component -}}
{{- $min := $values.podDisruptionBudget.minAvailable -}}
{{- $counted := not (or (kindIs "invalid" $min) (kindIs "string" $min)) -}}
{{- if and $values.podDisruptionBudget.enabled $counted (gt (int $values.replicas) 1) (ge (int $min) (int $values.replicas)) -}}
{{- fail (printf "%s.podDisruptionBudget.minAvailable (%v) must be below %s.replicas (%v): no pod could ever be evicted, no node drained" $component $min $component $values.replicas) -}}
{{- end -}}
{{- if and $values.podDisruptionBudget.enabled (kindIs "invalid" $min) (kindIs "invalid" $values.podDisruptionBudget.maxUnavailable) -}}
{{- fail (printf "%s.podDisruptionBudget: set minAvailable or maxUnavailable (or enabled=false)" $component) -}}
{{- end -}}
{{- end -}}
{{- if $v.dns.enabled -}}
{{- $gatewayAccount := include "trellis.gatewayServiceAccount" . -}}
{{- if eq $gatewayAccount (include "trellis.dnsServiceAccount" .) -}}
{{- fail (printf "gateway.serviceAccount.name and dns.serviceAccount.name are both %s: each gets its own certificates (node or DNS), so they need their own accounts" $gatewayAccount) -}}
{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $v.peers -}}
{{- if eq .id $v.cluster.id -}}
{{- fail (printf "peers: %s is this cluster itself (cluster.id)" .id) -}}
{{- end -}}
{{- if hasKey $seen .id -}}
{{- fail (printf "peers: %s is listed twice" .id) -}}
{{- end -}}
{{- $_ := set $seen .id true -}}
{{- end -}}
{{- end -}}
