{{/* The serving options of the shards (KV cache in MiB, kernels, KV storage, prefix cache) and
of the router (KV reservation, default length cap) as command-line flags: a YAML list of quoted
strings, or "".
A value equal to the binary's own default passes no flag: the binary's default applies, and a
chart upgrade with default values renders the same manifests (and shard group revision) as
before these values existed. The chart's schema allows exactly the binaries' choices
(tests/unit/test_k8s_serving.py parses the rendered flags with their own parsers). */}}
{{- define "cpumesh.shardServingArgs" -}}
{{- $s := .Values.shard -}}
{{- $args := list -}}
{{- if not (kindIs "invalid" $s.kvCacheMb) -}}
{{- /* Mutually exclusive with --kv-capacity-tokens, which the shard is then not given. */ -}}
{{- $mb := float64 $s.kvCacheMb -}}
{{- $args = concat $args (list "--kv-cache-mb" (eq $mb (floor $mb) | ternary (int64 $mb) $mb | toString)) -}}
{{- end -}}
{{- $kernels := $s.kernels | default "auto" -}}
{{- if ne $kernels "auto" -}}
{{- $args = concat $args (list "--kernels" $kernels) -}}
{{- end -}}
{{- $kvDtype := $s.kvDtype | default "auto" -}}
{{- if ne $kvDtype "auto" -}}
{{- $args = concat $args (list "--kv-dtype" $kvDtype) -}}
{{- end -}}
{{- if has (toString $s.prefixCache) (list "false" "off") -}}
{{- $args = concat $args (list "--prefix-cache" "off") -}}
{{- end -}}
{{- range $args }}
- {{ . | quote }}
{{- end -}}
{{- end -}}

{{- define "cpumesh.routerServingArgs" -}}
{{- $r := .Values.router -}}
{{- $args := list -}}
{{- $reservation := $r.kvReservation | default "on_demand" -}}
{{- if ne $reservation "on_demand" -}}
{{- $args = concat $args (list "--kv-reservation" $reservation) -}}
{{- end -}}
{{- $maxNew := $r.defaultMaxNewTokens | default 1024 | int -}}
{{- if ne $maxNew 1024 -}}
{{- $args = concat $args (list "--default-max-new-tokens" (toString $maxNew)) -}}
{{- end -}}
{{- range $args }}
- {{ . | quote }}
{{- end -}}
{{- end -}}
