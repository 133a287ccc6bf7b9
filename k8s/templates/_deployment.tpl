{{/* A router or tokenizer Deployment and its Service (pass a dict: ctx, component, args,
models). Both are stateless; a ConfigMap checksum rolls them when the settings change. */}}
{{- define "cpumesh.deployment" -}}
{{- $ := .ctx -}}
{{- $v := index $.Values .component -}}
{{- $name := printf "%s-%s" (include "cpumesh.fullname" $) .component -}}
{{- $sel := include "cpumesh.selectorLabels" (dict "ctx" $ "component" .component) -}}
{{- $http := and (eq .component "router") (include "cpumesh.httpEnabled" $) -}}
{{- $auth := dict "ctx" $ "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "cpumesh.labels" (dict "ctx" $ "component" .component) | nindent 4 }}
spec:
  replicas: {{ $v.replicas | int }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  selector:
    matchLabels:
      {{- $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "cpumesh.labels" (dict "ctx" $ "component" .component) | nindent 8 }}
      annotations:
        checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") $ | sha256sum }}
        {{- if $http }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $.Values.ports.http | quote }}
        prometheus.io/path: /metrics
        prometheus.io/scheme: {{ include "cpumesh.httpScheme" $ }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- include "cpumesh.podSecurityContext" $ | nindent 8 }}
      {{- if $.Values.image.pullSecrets }}
      {{- include "cpumesh.pullSecrets" $ | nindent 6 }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "cpumesh.image" $ }}
          imagePullPolicy: {{ $.Values.image.pullPolicy }}
          args:
            {{- toYaml .args | nindent 12 }}
            {{- if $.Values.tls.enabled }}
            {{- include "cpumesh.tlsArgs" $ | nindent 12 }}
            {{- end }}
            {{- include "cpumesh.authArgs" $auth | indent 12 }}
            {{- range $v.extraArgs }}
            - {{ . | quote }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "cpumesh.configName" $ }}
          env:
            {{- include "cpumesh.tmpEnv" $ | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $.Values.ports.grpc }}
            {{- if $http }}
            - name: {{ include "cpumesh.httpScheme" $ }}
              containerPort: {{ $.Values.ports.http }}
            {{- end }}
            {{- if $.Values.tls.enabled }}
            - name: health
              containerPort: {{ $.Values.ports.health }}
            {{- end }}
          {{- include "cpumesh.probes" (dict "ctx" $ "startupSeconds" 120) | nindent 10 }}
          resources:
            {{- include "cpumesh.resources" $v | nindent 12 }}
          securityContext:
            {{- include "cpumesh.containerSecurityContext" $ | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if .models }}
            - name: models
              mountPath: /models
              readOnly: true
            {{- end }}
            {{- if $.Values.tls.enabled }}
            {{- include "cpumesh.tlsMount" $ | nindent 12 }}
            {{- end }}
            {{- include "cpumesh.authMounts" $auth | indent 12 }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- if .models }}
        {{- include "cpumesh.modelVolume" $ | nindent 8 }}
        {{- end }}
        {{- if $.Values.tls.enabled }}
        {{- include "cpumesh.tlsVolume" $ | nindent 8 }}
        {{- end }}
        {{- include "cpumesh.authVolumes" $auth | indent 8 }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "cpumesh.labels" (dict "ctx" $ "component" .component) | nindent 4 }}
spec:
  type: {{ $v.service.type | default "ClusterIP" }}
  selector:
    {{- $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $.Values.ports.grpc }}
      targetPort: {{ $.Values.ports.grpc }}
      appProtocol: grpc
{{- if $http }}
---
{{- /* The HTTP API on its own Service: it can be exposed (or not) apart from gRPC. HTTPS with
tls.enabled (the router's certificate; clients present one from the CA, as for gRPC). */}}
apiVersion: v1
kind: Service
metadata:
  name: {{ $name }}-http
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "cpumesh.labels" (dict "ctx" $ "component" .component) | nindent 4 }}
spec:
  type: {{ $v.http.service.type | default "ClusterIP" }}
  selector:
    {{- $sel | nindent 4 }}
  ports:
    - name: {{ include "cpumesh.httpScheme" $ }}
      port: {{ $.Values.ports.http }}
      targetPort: {{ $.Values.ports.http }}
      appProtocol: {{ include "cpumesh.httpScheme" $ }}
{{- end }}
{{- end -}}
