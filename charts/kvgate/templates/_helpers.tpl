{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "kvgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "kvgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.labels" -}}
helm.sh/chart: {{ include "kvgate.chart" . }}
{{ include "kvgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kvgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "kvgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The official nats chart's service name: its fullname rule applied to this release. */}}
{{- define "kvgate.natsServiceName" -}}
{{- if .Values.nats.fullnameOverride }}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "nats" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-nats" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The NATS URL every kvgate process connects to. */}}
{{- define "kvgate.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "kvgate.natsServiceName" .) .Release.Namespace }}
{{- else }}
{{- required "externalNats.url is required when nats.enabled is false" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{- define "kvgate.workerName" -}}
{{- printf "%s-worker" (include "kvgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvgate.gatewayName" -}}
{{- printf "%s-gateway" (include "kvgate.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ConfigMap holding gateway.routerConfig as router.json. */}}
{{- define "kvgate.routerConfigName" -}}
{{- printf "%s-router" (include "kvgate.gatewayName" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* OpenTelemetry variables of one service, when tracing.otlpEndpoint is set. */}}
{{- define "kvgate.tracingEnv" -}}
{{- $root := index . 0 }}{{- $service := index . 1 }}
{{- with $root.Values.tracing }}
{{- if .otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $service | quote }}
{{- with .sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ . | quote }}
{{- end }}
{{- with .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* NATS_USER and NATS_PASSWORD of one bus user (gateway, worker, bridge-<name>), the password from
the Secret. */}}
{{- define "kvgate.busAuthEnv" -}}
{{- $root := index . 0 }}{{- $role := index . 1 }}
{{- if $root.Values.busAuth.enabled }}
- name: NATS_USER
  value: {{ $role | quote }}
- name: NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.busAuth.secretName | quote }}
      key: {{ printf "%s-password" $role | quote }}
{{- end }}
{{- end }}

{{/* A bridge's bus user: its own, as each worker's under `kvgate up`. */}}
{{- define "kvgate.bridgeUser" -}}
{{- printf "bridge-%s" . }}
{{- end }}

{{/* The worker ids the workers' StatefulSet gives its pods (their names): the worker user's. */}}
{{- define "kvgate.workerIds" -}}
{{- $ids := list }}
{{- $name := include "kvgate.workerName" . }}
{{- range $i := until (int .Values.workers.replicas) }}
{{- $ids = append $ids (printf "%s-%d" $name $i) }}
{{- end }}
{{- $ids | toJson }}
{{- end }}

{{/* Subject and bucket names under busNamespace, as router/protocol.py's Subjects names them. */}}
{{- define "kvgate.busNames" -}}
{{- $ns := .Values.busNamespace }}
{{- $under := replace "-" "_" $ns }}
{{- dict
  "prefix" (printf "kvgate.%s" $ns)
  "kvStream" (printf "KVGATE_%s_KV" (upper $under))
  "registry" (printf "kvgate_%s_workers" $under)
  "tokenizers" (printf "kvgate_%s_tokenizers" $under)
  | toJson }}
{{- end }}

{{/* What a user serving these worker ids may do on the bus: gateway/bus_roles.py worker_permissions,
rule for rule (tests/charts checks them against it). Argument: (list $root $workerIds). */}}
{{- define "kvgate.workerPermissions" -}}
{{- $n := include "kvgate.busNames" (index . 0) | fromJson }}
{{- $ids := index . 1 }}
{{- $api := "$JS.API" }}
{{- $registry := printf "KV_%s" $n.registry }}
{{- $tokenizers := printf "OBJ_%s" $n.tokenizers }}
{{- $publish := list }}
{{- range $ids }}{{- $publish = append $publish (printf "%s.kv.%s" $n.prefix .) }}{{- end }}
{{- range $ids }}{{- $publish = append $publish (printf "%s.load.%s" $n.prefix .) }}{{- end }}
{{- range $ids }}{{- $publish = append $publish (printf "$KV.%s.%s" $n.registry .) }}{{- end }}
{{- $publish = concat $publish (list
  (printf "%s.INFO" $api)
  (printf "%s.STREAM.INFO.%s" $api $n.kvStream)
  (printf "%s.STREAM.CREATE.%s" $api $n.kvStream)
  (printf "%s.STREAM.INFO.%s" $api $registry)
  (printf "%s.STREAM.CREATE.%s" $api $registry)
  (printf "$O.%s.>" $n.tokenizers)
  (printf "%s.STREAM.INFO.%s" $api $tokenizers)
  (printf "%s.STREAM.CREATE.%s" $api $tokenizers)
  (printf "%s.STREAM.MSG.GET.%s" $api $tokenizers)
  (printf "%s.DIRECT.GET.%s.>" $api $tokenizers)) }}
{{- $subscribe := list }}
{{- range $ids }}{{- $subscribe = append $subscribe (printf "%s.pin.%s" $n.prefix .) }}{{- end }}
{{- range $ids }}{{- $subscribe = append $subscribe (printf "%s.dump.%s" $n.prefix .) }}{{- end }}
{{- $subscribe = append $subscribe "_INBOX.>" }}
{{- dict "publish" (dict "allow" $publish) "subscribe" (dict "allow" $subscribe) "allow_responses" (dict "max" 1) | toJson }}
{{- end }}

{{/* What the gateway may do on the bus: gateway/bus_roles.py gateway_permissions, rule for rule. */}}
{{- define "kvgate.gatewayPermissions" -}}
{{- $n := include "kvgate.busNames" . | fromJson }}
{{- $deny := list (printf "%s.kv.>" $n.prefix) (printf "%s.load.>" $n.prefix) (printf "$KV.%s.>" $n.registry) }}
{{- range $op := list "CREATE" "UPDATE" "DELETE" "PURGE" "MSG.DELETE" }}
{{- range $stream := list $n.kvStream (printf "KV_%s" $n.registry) }}
{{- $deny = append $deny (printf "$JS.API.STREAM.%s.%s" $op $stream) }}
{{- end }}
{{- end }}
{{- dict "publish" (dict "allow" (list ">") "deny" $deny) "subscribe" (dict "allow" (list ">")) | toJson }}
{{- end }}
