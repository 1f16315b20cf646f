{{- define "flowscope.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flowscope.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flowscope.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flowscope.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "flowscope.fullname" .) -}}
{{- end -}}

{{/* The relay's own ServiceAccount: it reads nothing but the agents' pods, and only when it finds them so. */}}
{{- define "flowscope.relayServiceAccountName" -}}
{{- .Values.serviceAccount.relayName | default (printf "%s-relay" (include "flowscope.fullname" .)) -}}
{{- end -}}

{{/* Whether the relay finds the agents through the Kubernetes API (no relay.peers). */}}
{{- define "flowscope.relayDiscovers" -}}
{{- if and .Values.relay.enabled (not .Values.relay.peers) -}}true{{- end -}}
{{- end -}}

{{- define "flowscope.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The agents' TLS Secret: the operator's, or the one this chart generates. */}}
{{- define "flowscope.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "flowscope.fullname" .)) -}}
{{- end -}}

{{/* The name the agents' certificate carries and the relay checks (node addresses are not known here). */}}
{{- define "flowscope.agentServerName" -}}
{{- printf "agent.%s.%s" (include "flowscope.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/* Whether the agents serve the flow API on TCP (the relay reads them there). */}}
{{- define "flowscope.agentTcp" -}}
{{- if or .Values.relay.enabled .Values.agent.grpc.tcp -}}true{{- end -}}
{{- end -}}

{{/* Whether /metrics is served over TLS (the agents' certificate). */}}
{{- define "flowscope.metricsTls" -}}
{{- if and .Values.metrics.enabled .Values.metrics.tls.enabled -}}true{{- end -}}
{{- end -}}

{{/* Whether the agents mount the `tls` Secret (their flow API on TCP, or /metrics over TLS). */}}
{{- define "flowscope.agentTls" -}}
{{- if or (include "flowscope.agentTcp" .) (include "flowscope.metricsTls" .) -}}true{{- end -}}
{{- end -}}

{{/* The relay Service's names, the SANs of the relay's generated server certificate (the first is its CN). */}}
{{- define "flowscope.relayNames" -}}
{{- $service := printf "%s-relay" (include "flowscope.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- list (printf "%s.%s.svc" $service $ns) (printf "%s.%s.svc.%s" $service $ns .Values.clusterDomain) (printf "%s.%s" $service $ns) $service | join "," -}}
{{- end -}}

{{/* The agent's config file: the chart's settings, under what values.agent.config says (user keys win). */}}
{{- define "flowscope.agentConfig" -}}
{{- $managed := dict "status" (dict "address" (printf "127.0.0.1:%d" (int .Values.agent.statusPort))) -}}
{{- if include "flowscope.agentTcp" . -}}
{{- $_ := set $managed "grpc" (dict "address" (printf "0.0.0.0:%d" (int .Values.agent.grpc.port)) "tls_cert" "/etc/flowscope/tls/tls.crt" "tls_key" "/etc/flowscope/tls/tls.key" "tls_client_ca" "/etc/flowscope/tls/ca.crt") -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- if include "flowscope.metricsTls" . -}}
{{- $_ := set $managed "metrics" (dict "address" (printf "0.0.0.0:%d" (int .Values.metrics.port)) "tls_cert" "/etc/flowscope/tls/tls.crt" "tls_key" "/etc/flowscope/tls/tls.key") -}}
{{- else -}}
{{- $_ := set $managed "metrics" (dict "address" (printf "0.0.0.0:%d" (int .Values.metrics.port)) "plaintext_anywhere" true) -}}
{{- end -}}
{{- end -}}
{{- if .Values.clickhouse.enabled -}}
{{- $clickhouse := dict "url" (required "clickhouse.url is required when clickhouse.enabled is true" .Values.clickhouse.url) -}}
{{- if .Values.clickhouse.passwordSecret.name -}}
{{- $_ := set $clickhouse "password_file" "/etc/flowscope/clickhouse/password" -}}
{{- end -}}
{{- if .Values.clickhouse.cluster -}}
{{- $_ := set $clickhouse "cluster" .Values.clickhouse.cluster -}}
{{- end -}}
{{- $_ := set $clickhouse "ttl_days" (int .Values.clickhouse.ttlDays) -}}
{{- $_ := set $managed "clickhouse" $clickhouse -}}
{{- end -}}
{{- toYaml (mergeOverwrite $managed (deepCopy .Values.agent.config)) -}}
{{- end -}}

{{/* The relay's config file: its agents are relay.peers, or else the agent pods of this release, found
     through the Kubernetes API in the release's namespace at their container port named grpc. */}}
{{- define "flowscope.relayConfig" -}}
{{- $grpc := dict "address" (printf "0.0.0.0:%d" (int .Values.relay.port)) "socket" "/run/flowscope/flowscope.sock" "hubble_socket" "/run/flowscope/hubble.sock" -}}
{{- if .Values.relay.tls.enabled -}}
{{- $_ := set $grpc "tls_cert" "/etc/flowscope/relay-tls/tls.crt" -}}
{{- $_ := set $grpc "tls_key" "/etc/flowscope/relay-tls/tls.key" -}}
{{- if .Values.relay.tls.clientAuth -}}
{{- $_ := set $grpc "tls_client_ca" "/etc/flowscope/tls/ca.crt" -}}
{{- end -}}
{{- else -}}
{{- $_ := set $grpc "plaintext_anywhere" true -}}
{{- end -}}
{{- $managed := dict
  "grpc" $grpc
  "client" (dict "tls" true "tls_ca" "/etc/flowscope/tls/ca.crt" "tls_client_cert" "/etc/flowscope/tls/client.crt" "tls_client_key" "/etc/flowscope/tls/client.key" "tls_server_name" (include "flowscope.agentServerName" .))
  "relay" (dict "peers" .Values.relay.peers) -}}
{{- if not .Values.relay.peers -}}
{{- $selector := printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s,app.kubernetes.io/component=agent" .Chart.Name .Release.Name -}}
{{- $_ := set $managed "relay" (dict "discover_selector" $selector "discover_port" "grpc" "discover_namespace" .Release.Namespace) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $managed (deepCopy .Values.relay.config)) -}}
{{- end -}}
