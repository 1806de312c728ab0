{{/* Names */}}
{{- define "modelloader.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelloader.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "modelloader.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels: call with (dict "ctx" $ "component" "operator") */}}
{{- define "modelloader.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelloader.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "modelloader.labels" -}}
helm.sh/chart: {{ include "modelloader.chart" .ctx }}
{{ include "modelloader.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: modelloader
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pods that are Ray nodes: the Ray pods, the operator and the gateway (NetworkPolicy). */}}
{{- define "modelloader.rayNodeLabel" -}}
modelloader.dev/ray-node: {{ include "modelloader.fullname" . | quote }}
{{- end }}

{{/* Images: call with (dict "ctx" $ "image" .Values.operator.image) */}}
{{- define "modelloader.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end }}

{{- define "modelloader.rayImage" -}}
{{- $ray := .Values.ray.kuberay.image -}}
{{- if $ray.repository -}}
{{- include "modelloader.image" (dict "ctx" . "image" $ray) -}}
{{- else -}}
{{- include "modelloader.image" (dict "ctx" . "image" .Values.gateway.image) -}}
{{- end -}}
{{- end }}

{{- define "modelloader.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "modelloader.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelloader.gatewayServiceAccount" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (printf "%s-gateway" (include "modelloader.fullname" .)) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelloader.rayServiceAccount" -}}
{{- printf "%s-ray" (include "modelloader.fullname" .) }}
{{- end }}

{{/* The GCS address the operator and the gateway join. */}}
{{- define "modelloader.rayAddress" -}}
{{- if eq .Values.ray.mode "kuberay" -}}
{{- printf "%s-ray-head-svc.%s.svc:6379" (include "modelloader.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "ray.external.address is required with ray.mode=external" .Values.ray.external.address -}}
{{- end -}}
{{- end }}

{{- define "modelloader.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "modelloader.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{/* Environment every Ray process of the chart shares: auth, a writable HOME. */}}
{{- define "modelloader.rayEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: RAY_AUTH_MODE
  value: {{ .Values.ray.auth.mode | quote }}
{{- if eq .Values.ray.auth.mode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "modelloader.rayTokenSecret" . }}
      key: {{ .Values.ray.auth.secretKey }}
{{- end }}
{{- end }}

{{/* Environment of the operator and gateway: join the Ray cluster as a zero-resource node. */}}
{{- define "modelloader.rayClientEnv" -}}
{{ include "modelloader.rayEnv" . }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: RAY_HEAD_ADDRESS
  value: {{ include "modelloader.rayAddress" . | quote }}
- name: RAY_ADDRESS
  value: {{ include "modelloader.rayAddress" . | quote }}
{{- end }}

{{/* Volumes and mounts of every Ray pod: its own model cache, and the model roots. */}}
{{- define "modelloader.modelVolumes" -}}
- name: model-cache
{{- if .Values.modelCache.hostPath }}
  hostPath:
    path: {{ .Values.modelCache.hostPath }}
    type: DirectoryOrCreate
{{- else if .Values.modelCache.sizeLimit }}
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- range .Values.modelRoots }}
- name: {{ printf "model-root-%s" .name }}
{{- toYaml .volume | nindent 2 }}
{{- end }}
{{- end }}

{{- define "modelloader.modelMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
{{- range .Values.modelRoots }}
- name: {{ printf "model-root-%s" .name }}
  mountPath: {{ .mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The Ray resources a worker group advertises besides CPU, memory and GPU, in KubeRay's
rayStartParams form: a shell-quoted JSON map. Call with a dict of name -> amount. */}}
{{- define "modelloader.rayResources" -}}
{{- printf "%q" (toJson .) -}}
{{- end }}

{{/* NetworkPolicy peers that are Ray nodes of this release (and of an external cluster). */}}
{{- define "modelloader.rayPeers" -}}
- podSelector:
    matchLabels:
      {{- include "modelloader.rayNodeLabel" . | nindent 6 }}
{{- if eq .Values.ray.mode "external" }}
{{- with .Values.ray.external }}
{{- if or .namespaceSelector .podSelector }}
- podSelector:
    {{- toYaml .podSelector | nindent 4 }}
  {{- with .namespaceSelector }}
  namespaceSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
