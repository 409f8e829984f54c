{{/*
The one place values become environment variables. Each variable is a field of the component's
settings class (GatewaySettings: TINKERKUBE_GATEWAY_*, OperatorSettings: TINKERKUBE_OPERATOR_*);
tests/chart/test_env_contract.py checks every name here against those classes.
*/}}

{{/* The checkpoint store as a pod volume source (empty when there is none). */}}
{{- define "tinkerkube.checkpointVolume" -}}
{{- $c := .Values.trainer.checkpoints -}}
{{- if $c.hostPath -}}
hostPath:
  path: {{ $c.hostPath }}
  type: DirectoryOrCreate
{{- else if or $c.pvc.create $c.pvc.existingClaim -}}
persistentVolumeClaim:
  claimName: {{ include "tinkerkube.checkpointClaim" . }}
{{- end -}}
{{- end -}}

{{- define "tinkerkube.gateway.env" -}}
{{- $g := .Values.gateway -}}
- name: TINKERKUBE_GATEWAY_HOST
  value: "0.0.0.0"
- name: TINKERKUBE_GATEWAY_PORT
  value: {{ $g.port | quote }}
- name: TINKERKUBE_GATEWAY_LOG_LEVEL
  value: {{ $g.logLevel | quote }}
- name: TINKERKUBE_GATEWAY_BACKEND
  value: kubernetes
- name: TINKERKUBE_GATEWAY_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: TINKERKUBE_GATEWAY_TRAINER_START_TIMEOUT_SECONDS
  value: {{ $g.trainerStartTimeoutSeconds | quote }}
- name: TINKERKUBE_GATEWAY_CHECKPOINT_DIR
  value: {{ .Values.trainer.checkpoints.mountPath | quote }}
- name: TINKERKUBE_GATEWAY_MODEL_CACHE_DIR
  value: /tmp/models
{{- if .Values.database.postgres.enabled }}
- name: TINKERKUBE_GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.databaseSecret" . }}
      key: {{ .Values.database.postgres.secretKey }}
{{- else }}
- name: TINKERKUBE_GATEWAY_DATABASE_URL
  value: sqlite:////var/lib/tinkerkube/gateway.db
{{- end }}
- name: TINKERKUBE_GATEWAY_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.apiKeysSecret" . }}
      key: {{ $g.apiKeys.secretKey }}
{{ include "tinkerkube.trainerTokenEnv" (list "TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN" .) }}
{{- end -}}

{{- define "tinkerkube.operator.env" -}}
{{- $o := .Values.operator -}}
{{- $t := .Values.trainer -}}
{{- $c := $t.checkpoints -}}
- name: TINKERKUBE_OPERATOR_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: TINKERKUBE_OPERATOR_LOG_LEVEL
  value: {{ $o.logLevel | quote }}
- name: TINKERKUBE_OPERATOR_METRICS_PORT
  value: {{ $o.metricsPort | quote }}
- name: TINKERKUBE_OPERATOR_MAX_RESTARTS
  value: {{ $o.maxRestarts | quote }}
- name: TINKERKUBE_OPERATOR_PEERING
  value: {{ ternary $o.peering.name "" $o.peering.enabled | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_IMAGE
  value: {{ include "tinkerkube.image" (list . $t.image) | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_IMAGE_PULL_POLICY
  value: {{ $t.image.pullPolicy | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_IMAGE_PULL_SECRETS
  value: {{ .Values.imagePullSecrets | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_RESOURCES
  value: {{ $t.resources | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_GPUS
  value: {{ $t.gpus | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_GPU_RESOURCE
  value: {{ $t.gpuResourceName | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_NODE_SELECTOR
  value: {{ $t.nodeSelector | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_TOLERATIONS
  value: {{ $t.tolerations | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_PRIORITY_CLASS_NAME
  value: {{ $t.priorityClassName | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_POD_ANNOTATIONS
  value: {{ $t.podAnnotations | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_EXTRA_ENV
  value: {{ $t.extraEnv | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_SERVICE_ACCOUNT
  value: {{ include "tinkerkube.componentName" (list . "trainer") | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_AUTH_SECRET
  value: {{ include "tinkerkube.trainerTokenSecret" . | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_AUTH_SECRET_KEY
  value: {{ $t.authToken.secretKey | quote }}
- name: TINKERKUBE_OPERATOR_DEFAULT_IDLE_TIMEOUT_SECONDS
  value: {{ $t.idleTimeoutSeconds | quote }}
- name: TINKERKUBE_OPERATOR_CHECKPOINT_MOUNT_PATH
  value: {{ $c.mountPath | quote }}
- name: TINKERKUBE_OPERATOR_CHECKPOINT_HOST_PATH
  value: {{ $c.hostPath | quote }}
- name: TINKERKUBE_OPERATOR_CHECKPOINT_PVC
  value: {{ ternary "" (include "tinkerkube.checkpointClaim" .) (or (not (empty $c.hostPath)) (and (not $c.pvc.create) (not $c.pvc.existingClaim))) | quote }}
{{- end -}}
