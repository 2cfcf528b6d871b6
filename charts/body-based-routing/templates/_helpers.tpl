{{/* Name of the Deployment, Service and prefix of every other object. */}}
{{- define "bbr.name" -}}
{{- .Values.bbr.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bbr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bbr.selectorLabels" -}}
app: {{ include "bbr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bbr.labels" -}}
{{ include "bbr.selectorLabels" . }}
app.kubernetes.io/name: body-based-routing
app.kubernetes.io/component: body-based-router
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "bbr.chart" . }}
{{- end -}}

{{- define "bbr.serviceAccountName" -}}
{{- if .Values.bbr.serviceAccount.create -}}
{{- default (include "bbr.name" .) .Values.bbr.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.bbr.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bbr.image" -}}
{{- $image := .Values.bbr.image -}}
{{- $repo := $image.repository -}}
{{- if $image.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" $image.registry) $image.repository -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repo $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Namespace of the inference Gateway, where the provider objects live. */}}
{{- define "bbr.gatewayNamespace" -}}
{{- default .Release.Namespace .Values.inferenceGateway.namespace -}}
{{- end -}}

{{/* In-cluster DNS name of the bbr Service (clusterDomain: the cluster's DNS domain). */}}
{{- define "bbr.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "bbr.name" .) .Release.Namespace (.Values.clusterDomain | default "cluster.local" | trimSuffix ".") -}}
{{- end -}}

{{/* "true" when bbr streams (FULL_DUPLEX_STREAMED): asked for, or required by gke. */}}
{{- define "bbr.streaming" -}}
{{- if or .Values.bbr.streaming (eq .Values.provider.name "gke") }}true{{ end -}}
{{- end -}}

{{/* "true" when bbr serves TLS on the ext_proc port: asked for, or required by gke. */}}
{{- define "bbr.secureServing" -}}
{{- if or .Values.bbr.secureServing (eq .Values.provider.name "gke") }}true{{ end -}}
{{- end -}}

{{/* The namespaces bbr watches, as a JSON list ("*" alone for every namespace). */}}
{{- define "bbr.watchNamespaces" -}}
{{- $namespaces := .Values.bbr.watchNamespaces | default list -}}
{{- if or .Values.bbr.multiNamespace (has "*" $namespaces) -}}
{{- list "*" | toJson -}}
{{- else if $namespaces -}}
{{- $namespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{/*
The events the gateway sends bbr (GAIE/GKE names), as a JSON list: provider.supportedEvents,
or request headers and body; streaming (FULL_DUPLEX_STREAMED) always adds RequestTrailers,
which Envoy requires with that body mode.
*/}}
{{- define "bbr.events" -}}
{{- $events := .Values.provider.supportedEvents | default (list "RequestHeaders" "RequestBody") -}}
{{- if and (include "bbr.streaming" .) (not (has "RequestTrailers" $events)) -}}
{{- $events = append $events "RequestTrailers" -}}
{{- end -}}
{{- $events | uniq | toJson -}}
{{- end -}}

{{/*
Envoy's ext_proc processing_mode for those events, as YAML (keys as in Envoy's API).
Response bodies are STREAMED so that streamed (SSE) completions are not held back.
*/}}
{{- define "bbr.processingMode" -}}
{{- $events := include "bbr.events" . | fromJsonArray -}}
{{- $streaming := include "bbr.streaming" . -}}
request_header_mode: {{ ternary "SEND" "SKIP" (has "RequestHeaders" $events) }}
response_header_mode: {{ ternary "SEND" "SKIP" (has "ResponseHeaders" $events) }}
request_body_mode: {{ if not (has "RequestBody" $events) }}NONE{{ else if $streaming }}FULL_DUPLEX_STREAMED{{ else }}BUFFERED{{ end }}
response_body_mode: {{ ternary "STREAMED" "NONE" (has "ResponseBody" $events) }}
request_trailer_mode: {{ ternary "SEND" "SKIP" (has "RequestTrailers" $events) }}
response_trailer_mode: {{ ternary "SEND" "SKIP" (has "ResponseTrailers" $events) }}
{{- end -}}

{{/* The ConfigMap-safe name of a `models` entry: its name, or one derived from baseModel. */}}
{{- define "bbr.modelName" -}}
{{- if .name -}}
{{- .name -}}
{{- else -}}
{{- $slug := regexReplaceAll "[^a-z0-9]+" (lower .baseModel) "-" | trunc 54 | trimAll "-" -}}
{{- default "model" $slug -}}
{{- end -}}
{{- end -}}

{{/* ext_proc backend reference to the bbr Service, for objects in the gateway namespace. */}}
{{- define "bbr.backendRef" -}}
group: ""
kind: Service
name: {{ include "bbr.name" . }}
{{- if ne (include "bbr.gatewayNamespace" .) .Release.Namespace }}
namespace: {{ .Release.Namespace }}
{{- end }}
port: {{ .Values.bbr.port }}
{{- end -}}

{{/* targetRefs naming the inference Gateway. */}}
{{- define "bbr.gatewayTargetRefs" -}}
- group: gateway.networking.k8s.io
  kind: Gateway
  name: {{ .Values.inferenceGateway.name }}
{{- end -}}
