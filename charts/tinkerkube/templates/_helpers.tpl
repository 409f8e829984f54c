{{/*
Names follow KubeRay's helpers: every name is truncated to 63 characters (the DNS label limit) and
stripped of a trailing "-". Component names append a suffix after truncating the base to leave room.
*/}}
{{- define "tinkerkube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tinkerkube.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", the base cut so that the whole stays within 63 characters. */}}
{{- define "tinkerkube.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $max := sub 62 (len $suffix) | int -}}
{{- printf "%s-%s" (include "tinkerkube.fullname" $root | trunc $max | trimSuffix "-") $suffix -}}
{{- end -}}

{{- define "tinkerkube.gateway.fullname" -}}{{ include "tinkerkube.componentName" (list . "gateway") }}{{- end -}}
{{- define "tinkerkube.operator.fullname" -}}{{ include "tinkerkube.componentName" (list . "operator") }}{{- end -}}
{{/* Cluster-scoped names carry the namespace: two releases of the same name must not collide. */}}
{{- define "tinkerkube.operator.clusterRoleName" -}}
{{- printf "%s-%s" .Release.Namespace (include "tinkerkube.operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "tinkerkube.trainerTokenSecret" -}}
{{- default (include "tinkerkube.componentName" (list . "trainer-token")) .Values.trainer.authToken.existingSecret -}}
{{- end -}}
{{- define "tinkerkube.apiKeysSecret" -}}
{{- default (include "tinkerkube.componentName" (list . "api-keys")) .Values.gateway.apiKeys.existingSecret -}}
{{- end -}}
{{- define "tinkerkube.databaseSecret" -}}
{{- default (include "tinkerkube.componentName" (list . "database")) .Values.database.postgres.existingSecret -}}
{{- end -}}
{{- define "tinkerkube.checkpointClaim" -}}
{{- default (include "tinkerkube.componentName" (list . "checkpoints")) .Values.trainer.checkpoints.pvc.existingClaim -}}
{{- end -}}

{{- define "tinkerkube.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tinkerkube.labels" -}}
helm.sh/chart: {{ include "tinkerkube.chart" . }}
{{ include "tinkerkube.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tinkerkube
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tinkerkube.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tinkerkube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: (list $ "gateway"). */}}
{{- define "tinkerkube.componentLabels" -}}
{{ include "tinkerkube.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tinkerkube.componentSelectorLabels" -}}
{{ include "tinkerkube.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* An image reference from {registry, repository, tag}: (list $ .Values.gateway.image). */}}
{{- define "tinkerkube.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $tag := default $root.Chart.AppVersion $image.tag | toString -}}
{{- if $image.registry -}}
{{- printf "%s/%s:%s" $image.registry $image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "tinkerkube.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "tinkerkube.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tinkerkube.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "tinkerkube.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Fail early and clearly on combinations the schema cannot express. */}}
{{- define "tinkerkube.validate" -}}
{{- if and (gt (int .Values.gateway.replicas) 1) (not .Values.database.postgres.enabled) -}}
{{- fail (printf "gateway.replicas=%d needs PostgreSQL: SQLite lives on a single-writer volume. Set database.postgres.enabled=true with database.postgres.existingSecret (or database.postgres.url), or use gateway.replicas=1." (int .Values.gateway.replicas)) -}}
{{- end -}}
{{- if and .Values.database.postgres.enabled (not .Values.database.postgres.existingSecret) (not .Values.database.postgres.url) -}}
{{- fail "database.postgres.enabled=true needs database.postgres.existingSecret (a Secret holding the URL) or database.postgres.url." -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.peering.enabled) -}}
{{- fail (printf "operator.replicas=%d needs operator.peering.enabled=true: without a kopf peering every replica would reconcile the same sessions and create duplicate pods." (int .Values.operator.replicas)) -}}
{{- end -}}
{{- if and .Values.ingress.tls.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.tls.enabled=true needs ingress.host: a certificate names a host." -}}
{{- end -}}
{{- end -}}

{{/* The trainer-token env var, read from the Secret: (list "ENV_NAME" $). */}}
{{- define "tinkerkube.trainerTokenEnv" -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tinkerkube.trainerTokenSecret" (index . 1) }}
      key: {{ (index . 1).Values.trainer.authToken.secretKey }}
{{- end -}}
