{{/*
Helpers for the gateway providers' routing objects (envoy-gateway, kgateway, gke):
catch-all route, body limits, early header removal.
*/}}

{{/* The routing headers bbr owns: removed from client requests before any route is chosen. */}}
{{- define "bbr.routingHeaders" -}}
["x-gateway-base-model-name", "x-gateway-model-name"]
{{- end -}}

{{/* bbr's --max-body-bytes as it will run: bbr.flags wins over bbr.maxBodyBytes, as on the command line. */}}
{{- define "bbr.maxBodyBytes" -}}
{{- $flag := index .Values.bbr.flags "max-body-bytes" -}}
{{- if $flag -}}{{- $flag | int64 -}}{{- else -}}{{- .Values.bbr.maxBodyBytes | int64 -}}{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity (1048576, "20Mi", "16M") in bytes. */}}
{{- define "bbr.quantityBytes" -}}
{{- $q := . -}}
{{- if kindIs "float64" $q -}}{{- $q = $q | int64 | toString -}}{{- else -}}{{- $q = toString $q -}}{{- end -}}
{{- $digits := regexFind "^[0-9]+" $q -}}
{{- $suffix := trimPrefix $digits $q -}}
{{- $mult := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 -}}
{{- if not (hasKey $mult $suffix) -}}
{{- fail (printf "%q is not a byte quantity (digits, optionally followed by k, M, G, Ki, Mi or Gi)" $q) -}}
{{- end -}}
{{- mul ($digits | int64) (index $mult $suffix) -}}
{{- end -}}

{{/*
The gateway's per-connection buffer limit in bytes for BUFFERED bodies, or "" to leave the
gateway's default (streaming: Envoy never holds the whole body). bbr accepts gRPC messages
up to --max-body-bytes + 64 KiB, so a limit up to --max-body-bytes + 32 KiB (32 KiB left for
the message's own framing) means every body Envoy forwards gets an answer from bbr: 413
request_too_large (OpenAI JSON) between the two limits, Envoy's own 413 above its limit, and
never Envoy's 500 for a gRPC message bbr refused. A larger limit fails here. `explicit` is
the provider's own value (quantity or bytes), "" or 0 for the default.
*/}}
{{- define "bbr.bufferLimitBytes" -}}
{{- $root := index . 0 -}}
{{- $explicit := index . 1 -}}
{{- $key := index . 2 -}}
{{- $max := include "bbr.maxBodyBytes" $root | int64 -}}
{{- $ceiling := add $max 32768 -}}
{{- if and $explicit (ne (toString $explicit) "0") -}}
{{- $bytes := include "bbr.quantityBytes" $explicit | int64 -}}
{{- $shown := $explicit -}}
{{- if kindIs "float64" $explicit -}}{{- $shown = $explicit | int64 -}}{{- end -}}
{{- if gt $bytes $ceiling -}}
{{- fail (printf "%s=%v (%d bytes) is larger than bbr's --max-body-bytes (%d) + 32 KiB: Envoy would send bbr bodies over its gRPC message limit and answer 500 instead of bbr's 413. Raise bbr.maxBodyBytes or lower %s (at most %d)" $key $shown $bytes $max $key $ceiling) -}}
{{- end -}}
{{- $bytes -}}
{{- else if not (include "bbr.streaming" $root) -}}
{{- $ceiling -}}
{{- end -}}
{{- end -}}

{{/* "true" when the provider enables its ext_proc filter per route, so a route must match before bbr runs. */}}
{{- define "bbr.needsCatchAll" -}}
{{- if and .Values.provider.catchAllRoute.enabled (has .Values.provider.name (list "envoy-gateway" "kgateway")) }}true{{ end -}}
{{- end -}}

{{/* The OpenAI-shaped error a client gets when no model route takes its request. */}}
{{- define "bbr.noRouteBody" -}}
{{- dict "error" (dict "message" "no route for this request: the body names no model the gateway serves" "type" "invalid_request_error" "param" "model" "code" "model_not_found") | toJson -}}
{{- end -}}
