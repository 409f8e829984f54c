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

{{/* Where the checkpoint store is mounted: tinkerkube_contract.resource.CheckpointStore's default. */}}
{{- define "tinkerkube.checkpointMountPath" -}}/checkpoints{{- end -}}

{{- define "tinkerkube.gateway.env" -}}
{{- $g := .Values.gateway -}}
{{- $t := .Values.trainer -}}
- name: TINKERKUBE_GATEWAY_HOST
  value: "0.0.0.0"
- name: TINKERKUBE_GATEWAY_PORT
  value: {{ $g.port | quote }}
- name: TINKERKUBE_GATEWAY_BACKEND
  value: kubernetes
- name: TINKERKUBE_GATEWAY_STATE_DIR
  value: /var/lib/tinkerkube
- name: TINKERKUBE_GATEWAY_CHECKPOINT_DIR
  value: {{ include "tinkerkube.checkpointMountPath" . | quote }}
{{- if .Values.database.postgres.enabled }}
- name: TINKERKUBE_GATEWAY_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.databaseSecret" . }}
      key: {{ .Values.database.postgres.secretKey }}
{{- end }}
- name: TINKERKUBE_GATEWAY_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.apiKeysSecret" . }}
      key: {{ $g.apiKeys.secretKey }}
- name: TINKERKUBE_GATEWAY_DEFAULT_BASE_MODEL
  value: {{ $g.defaultBaseModel | quote }}
- name: TINKERKUBE_GATEWAY_MODELS
  value: {{ $g.models | toJson | quote }}
- name: TINKERKUBE_GATEWAY_MODEL_ALIASES
  value: {{ $g.modelAliases | toJson | quote }}
- name: TINKERKUBE_GATEWAY_SESSION_IDLE_TIMEOUT_SECONDS
  value: {{ $g.sessionIdleTimeoutSeconds | quote }}
- name: TINKERKUBE_GATEWAY_AUDIT_RETENTION_DAYS
  value: {{ $g.auditRetentionDays | quote }}
- name: TINKERKUBE_GATEWAY_USAGE_RETENTION_DAYS
  value: {{ $g.usageRetentionDays | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_START_TIMEOUT_SECONDS
  value: {{ $g.trainerStartTimeoutSeconds | quote }}
- name: TINKERKUBE_GATEWAY_MAX_BODY_BYTES
  value: {{ $g.maxBodyBytes | int64 | quote }}
- name: TINKERKUBE_GATEWAY_IMAGE_ASSET_HOSTS
  value: {{ $g.imageAssetHosts | toJson | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_REPLICAS
  value: {{ $t.replicas | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_NPROC_PER_NODE
  value: {{ $t.procsPerPod | quote }}
{{- /* The Kubernetes backend's settings: where sessions go, the token, and trainer pod defaults. */}}
- name: TINKERKUBE_GATEWAY_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{ include "tinkerkube.trainerTokenEnv" (list "TINKERKUBE_GATEWAY_TRAINER_AUTH_TOKEN" .) }}
- name: TINKERKUBE_GATEWAY_TRAINER_CPU
  value: {{ $t.cpu | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_MEMORY
  value: {{ $t.memory | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_GPUS
  value: {{ $t.gpus | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_NODE_SELECTOR
  value: {{ $t.nodeSelector | toJson | quote }}
- name: TINKERKUBE_GATEWAY_TRAINER_TOLERATIONS
  value: {{ $t.tolerations | toJson | quote }}
{{- with $t.priorityClassName }}
- name: TINKERKUBE_GATEWAY_TRAINER_PRIORITY_CLASS_NAME
  value: {{ . | quote }}
{{- end }}
- name: TINKERKUBE_GATEWAY_TRAINER_IDLE_TIMEOUT_SECONDS
  value: {{ $t.idleTimeoutSeconds | quote }}
{{- end -}}

{{- define "tinkerkube.operator.env" -}}
{{- $o := .Values.operator -}}
{{- $t := .Values.trainer -}}
{{- $c := $t.checkpoints -}}
- name: TINKERKUBE_OPERATOR_NAMESPACES
  value: {{ list .Release.Namespace | toJson | quote }}
- name: TINKERKUBE_OPERATOR_TRAINER_IMAGE
  value: {{ include "tinkerkube.image" (list . $t.image) | quote }}
- name: TINKERKUBE_OPERATOR_IMAGE_PULL_POLICY
  value: {{ $t.image.pullPolicy | quote }}
- name: TINKERKUBE_OPERATOR_SERVICE_ACCOUNT
  value: {{ include "tinkerkube.componentName" (list . "trainer") | quote }}
- name: TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET
  value: {{ include "tinkerkube.trainerTokenSecret" . | quote }}
- name: TINKERKUBE_OPERATOR_AUTH_TOKEN_SECRET_KEY
  value: {{ $t.authToken.secretKey | quote }}
{{- if $c.hostPath }}
- name: TINKERKUBE_OPERATOR_CHECKPOINT_HOST_PATH
  value: {{ $c.hostPath | quote }}
{{- else if or $c.pvc.create $c.pvc.existingClaim }}
- name: TINKERKUBE_OPERATOR_CHECKPOINT_PVC
  value: {{ include "tinkerkube.checkpointClaim" . | quote }}
{{- end }}
{{- with $t.modelCache.dir }}
- name: TINKERKUBE_OPERATOR_MODEL_CACHE_DIR
  value: {{ . | quote }}
{{- end }}
{{- with $t.modelCache.pvc }}
- name: TINKERKUBE_OPERATOR_MODEL_CACHE_PVC
  value: {{ . | quote }}
{{- end }}
- name: TINKERKUBE_OPERATOR_MAX_RESTARTS
  value: {{ $o.maxRestarts | quote }}
- name: TINKERKUBE_OPERATOR_UNSCHEDULABLE_TIMEOUT_SECONDS
  value: {{ $o.unschedulableTimeoutSeconds | quote }}
- name: TINKERKUBE_OPERATOR_IMAGE_PULL_TIMEOUT_SECONDS
  value: {{ $o.imagePullTimeoutSeconds | quote }}
- name: TINKERKUBE_OPERATOR_STANDALONE
  value: {{ ternary "false" "true" $o.peering.enabled | quote }}
- name: TINKERKUBE_OPERATOR_PEERING_NAME
  value: {{ $o.peering.name | quote }}
- name: TINKERKUBE_OPERATOR_CLUSTER_DOMAIN
  value: {{ $o.clusterDomain | quote }}
- name: TINKERKUBE_OPERATOR_METRICS_PORT
  value: {{ $o.metricsPort | quote }}
- name: TINKERKUBE_OPERATOR_POSTING_LEVEL
  value: {{ $o.eventsLevel | quote }}
{{- with $o.pools }}
- name: TINKERKUBE_OPERATOR_POOLS
  value: {{ .enabled | quote }}
- name: TINKERKUBE_OPERATOR_POOL_MAX_RUNS
  value: {{ .maxRuns | quote }}
- name: TINKERKUBE_OPERATOR_POOL_MAX_LORA_RANK
  value: {{ .maxLoraRank | quote }}
- name: TINKERKUBE_OPERATOR_POOL_IDLE_TIMEOUT_SECONDS
  value: {{ .idleTimeoutSeconds | quote }}
- name: TINKERKUBE_OPERATOR_POOL_SHARDING
  value: {{ .sharding | quote }}
- name: TINKERKUBE_OPERATOR_POOL_SAMPLER
  value: {{ .sampler | quote }}
- name: TINKERKUBE_OPERATOR_SHARE_POOLS_ACROSS_TENANTS
  value: {{ .shareAcrossTenants | quote }}
- name: TINKERKUBE_OPERATOR_MAX_POOLS_PER_TENANT
  value: {{ .maxPoolsPerTenant | quote }}
- name: TINKERKUBE_OPERATOR_MAX_RUNS_PER_TENANT
  value: {{ .maxRunsPerTenant | quote }}
- name: TINKERKUBE_OPERATOR_WARM_POOLS
  value: {{ .warm | toJson | quote }}
{{- end }}
{{- if $o.pools.enabled }}
# Detaching a deleted session's run from its pool speaks the pod API, with the trainers' token.
- name: TINKERKUBE_OPERATOR_TRAINER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.trainerTokenSecret" . | quote }}
      key: {{ $t.authToken.secretKey | quote }}
{{- end }}
{{- end -}}
