{{/* A Ray pod template for KubeRay. Call with (dict "ctx" $ "component" "ray-worker"
"group" "cpu" "spec" <group values> "limits" <extra container limits> "env" <extra env>). */}}
{{- define "modelloader.rayPodTemplate" -}}
{{- $ctx := .ctx }}
{{- $labels := dict "ctx" $ctx "component" .component }}
metadata:
  labels:
    {{- include "modelloader.labels" $labels | nindent 4 }}
    {{- include "modelloader.rayNodeLabel" $ctx | nindent 4 }}
    modelloader.dev/ray-group: {{ .group }}
spec:
  serviceAccountName: {{ include "modelloader.rayServiceAccount" $ctx }}
  # Ray pods need no Kubernetes API access.
  automountServiceAccountToken: false
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  containers:
    # KubeRay requires the Ray container first; it supplies the `ray start` command.
    - name: ray
      image: {{ include "modelloader.rayImage" $ctx }}
      imagePullPolicy: {{ $ctx.Values.ray.kuberay.image.pullPolicy }}
      env:
        {{- include "modelloader.rayEnv" $ctx | nindent 8 }}
        # This node's own model cache: its workers fetch the models they run into it.
        - name: MODELLOADER_CACHE_DIR
          value: {{ printf "%s/models" $ctx.Values.modelCache.mountPath | quote }}
        {{- range $k, $v := .env }}
        - name: {{ $k }}
          value: {{ $v | quote }}
        {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.containerSecurityContext | nindent 8 }}
      {{- /* Our own probes, so KubeRay injects none: its probes ask Ray's dashboard agent,
      which the runtime image does not carry (modelloader_workers/node_probe.py says why).
      Timings follow KubeRay's defaults. */}}
      {{- $probe := list "python" "-m" "modelloader_workers.node_probe" "raylet" }}
      {{- if .gcsPort }}
      {{- $probe = list "python" "-m" "modelloader_workers.node_probe" "gcs" (printf "--port=%v" .gcsPort) }}
      {{- end }}
      {{- with .tempDir }}
      {{- $probe = append $probe (printf "--temp-dir=%v" .) }}
      {{- end }}
      readinessProbe:
        exec:
          command: {{ toJson $probe }}
        initialDelaySeconds: 10
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 10
      livenessProbe:
        exec:
          command: {{ toJson $probe }}
        initialDelaySeconds: 30
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 120
      {{- $resources := deepCopy .spec.resources }}
      {{- if .limits }}
      {{- $_ := set $resources "limits" (merge (deepCopy .limits) (default dict $resources.limits)) }}
      {{- $_ := set $resources "requests" (merge (deepCopy .limits) (default dict $resources.requests)) }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
        {{- include "modelloader.modelMounts" $ctx | nindent 8 }}
  volumes:
    - name: tmp
      emptyDir: {}
    # Ray's object store lives in /dev/shm.
    - name: shm
      emptyDir:
        medium: Memory
    {{- include "modelloader.modelVolumes" $ctx | nindent 4 }}
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
