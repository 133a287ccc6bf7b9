{{/* Names. The full name is cut to 40 characters so that "<name>-shard-<rank>" and the
StatefulSet's controller-revision-hash label stay within 63. */}}
{{- define "cpumesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cpumesh.shardName" -}}{{ include "cpumesh.fullname" . }}-shard{{- end -}}
{{- define "cpumesh.routerName" -}}{{ include "cpumesh.fullname" . }}-router{{- end -}}
{{- define "cpumesh.tokenizerName" -}}{{ include "cpumesh.fullname" . }}-tokenizer{{- end -}}
{{- define "cpumesh.configName" -}}{{ include "cpumesh.fullname" . }}-config{{- end -}}

{{/* Labels: the selector labels of one component (pass a dict: ctx, component). */}}
{{- define "cpumesh.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cpumesh.labels" -}}
{{ include "cpumesh.selectorLabels" . }}
app.kubernetes.io/part-of: cpumesh
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "cpumesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The DNS name of shard <rank> under the headless Service (pass a dict: ctx, rank). */}}
{{- define "cpumesh.shardHost" -}}
{{- $name := include "cpumesh.shardName" .ctx -}}
{{- printf "%s-%d.%s.%s.svc.%s" $name (int .rank) $name .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* Comma-separated host:port of every rank, in rank order (pass a dict: ctx, port). */}}
{{- define "cpumesh.shardAddrs" -}}
{{- $addrs := list -}}
{{- range $rank := until (int .ctx.Values.tp) -}}
{{- $addrs = append $addrs (printf "%s:%d" (include "cpumesh.shardHost" (dict "ctx" $.ctx "rank" $rank)) (int $.port)) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{/* Everything a shard's behaviour depends on. Its hash labels the shard pods and selects them in
the headless Service, so pods of two versions never see each other in DNS. */}}
{{- define "cpumesh.groupRevision" -}}
{{- /* The serving options count as the flags they pass (none at their defaults), so that a
chart upgrade with default values keeps the revision and does not replace the group. */ -}}
{{- $shard := omit .Values.shard "kvCacheMb" "kernels" "kvDtype" "prefixCache" -}}
{{- $inputs := dict "image" (include "cpumesh.image" .) "tp" .Values.tp "model" .Values.model "shard" $shard "tls" .Values.tls "curve" .Values.curve "internalToken" .Values.auth.internalToken "ports" .Values.ports "domain" .Values.clusterDomain "security" .Values.podSecurity -}}
{{- with include "cpumesh.shardServingArgs" . }}{{ $_ := set $inputs "serving" . }}{{ end -}}
{{- toJson $inputs | sha256sum | trunc 10 -}}
{{- end -}}

{{/* The port kubelet probes reach: the plaintext health port when mTLS is on. */}}
{{- define "cpumesh.healthPort" -}}
{{- if .Values.tls.enabled }}{{ .Values.ports.health }}{{ else }}{{ .Values.ports.grpc }}{{ end -}}
{{- end -}}

{{/* With mTLS on: the plaintext health port and the TLS files (all three services). */}}
{{- define "cpumesh.tlsArgs" -}}
- --health-listen
- 0.0.0.0:{{ .Values.ports.health }}
- --tls-cert
- /etc/cpumesh/tls/tls.crt
- --tls-key
- /etc/cpumesh/tls/tls.key
- --tls-ca
- /etc/cpumesh/tls/ca.crt
{{- end -}}

{{/* Probes (pass a dict: ctx, startupSeconds). Startup and liveness ask for the "liveness"
service, which a process answers SERVING while it is alive, never depending on peers; readiness
asks for "" (the service is ready: for a shard, weights loaded and mesh whole). */}}
{{- define "cpumesh.probes" -}}
{{- $port := include "cpumesh.healthPort" .ctx | int -}}
startupProbe:
  grpc:
    port: {{ $port }}
    service: liveness
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ div (add .startupSeconds 9) 10 }}
livenessProbe:
  grpc:
    port: {{ $port }}
    service: liveness
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/* Requests equal to limits (Guaranteed QoS) unless guaranteed is false (pass the component's values). */}}
{{- define "cpumesh.resources" -}}
requests:
  cpu: {{ .resources.cpu | int | quote }}
  memory: {{ .resources.memory | quote }}
limits:
  {{- if .guaranteed }}
  cpu: {{ .resources.cpu | int | quote }}
  {{- end }}
  memory: {{ .resources.memory | quote }}
{{- end -}}

{{- define "cpumesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "cpumesh.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A writable /tmp (the root filesystem is read-only) and HOME in it. */}}
{{- define "cpumesh.tmpEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
{{- end -}}

{{- define "cpumesh.modelVolume" -}}
- name: models
  {{- if eq .Values.model.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.volume.claimName }}
    readOnly: true
  {{- else }}
  hostPath:
    path: {{ .Values.model.volume.hostPath }}
    type: Directory
  {{- end }}
{{- end -}}

{{/* Whether the router serves its HTTP API: router.http.enabled ("auto", from older values
files, means true). With tls.enabled it is HTTPS with mutual TLS, like gRPC. "true" or "". */}}
{{- define "cpumesh.httpEnabled" -}}
{{- $on := .Values.router.http.enabled -}}
{{- if or (eq (toString $on) "auto") (eq (toString $on) "true") }}true{{ end -}}
{{- end -}}

{{/* The HTTP API's scheme: "https" with tls.enabled, else "http". */}}
{{- define "cpumesh.httpScheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The auth flags, mounts and volumes of a component (pass a dict: ctx, component): the
internal token on every service, the API keys on the router. */}}
{{- define "cpumesh.authArgs" -}}
{{- if .ctx.Values.auth.internalToken.enabled }}
- --internal-token-file
- /etc/cpumesh/internal-token/token
{{- end }}
{{- if and (eq .component "router") .ctx.Values.auth.apiKeys.enabled }}
- --api-keys-file
- /etc/cpumesh/api-keys/keys
{{- end }}
{{- end -}}

{{- define "cpumesh.authMounts" -}}
{{- if .ctx.Values.auth.internalToken.enabled }}
- name: internal-token
  mountPath: /etc/cpumesh/internal-token
  readOnly: true
{{- end }}
{{- if and (eq .component "router") .ctx.Values.auth.apiKeys.enabled }}
- name: api-keys
  mountPath: /etc/cpumesh/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "cpumesh.authVolumes" -}}
{{- if .ctx.Values.auth.internalToken.enabled }}
- name: internal-token
  secret:
    secretName: {{ .ctx.Values.auth.internalToken.secretName }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- end }}
{{- if and (eq .component "router") .ctx.Values.auth.apiKeys.enabled }}
- name: api-keys
  secret:
    secretName: {{ .ctx.Values.auth.apiKeys.secretName }}
    defaultMode: 0440
    items:
      - key: keys
        path: keys
{{- end }}
{{- end -}}

{{- define "cpumesh.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end -}}

{{- define "cpumesh.tlsMount" -}}
- name: tls
  mountPath: /etc/cpumesh/tls
  readOnly: true
{{- end -}}

{{- define "cpumesh.pullSecrets" -}}
imagePullSecrets:
  {{- range .Values.image.pullSecrets }}
  - name: {{ . }}
  {{- end }}
{{- end -}}
