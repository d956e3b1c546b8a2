{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name if it already contains
the chart name, else "<release>-<chart>".
*/}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object: herald.identityLabels plus herald.metaLabels.
Objects add their own app.kubernetes.io/component.
*/}}
{{- define "herald.labels" -}}
{{ include "herald.identityLabels" . }}
{{ include "herald.metaLabels" . }}
{{- end }}

{{- define "herald.identityLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "herald.metaLabels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
app.kubernetes.io/version: {{ include "herald.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{/*
Selector of the serving pods. The component label keeps the migration Job's
pod out of the Services and the PodDisruptionBudget.
*/}}
{{- define "herald.selectorLabels" -}}
{{ include "herald.identityLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
The image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "herald.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
The image reference, by digest when image.digest is set.
*/}}
{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "herald.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the serving pods.
*/}}
{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret holding DATABASE_URL and friends, and its key names.
*/}}
{{- define "herald.secretName" -}}
{{- if .Values.secret.create }}
{{- include "herald.fullname" . }}
{{- else }}
{{- default (include "herald.fullname" .) .Values.existingSecret.name }}
{{- end }}
{{- end }}

{{- define "herald.databaseUrlKey" -}}
{{- if .Values.secret.create }}DATABASE_URL{{ else }}{{ .Values.existingSecret.databaseUrlKey }}{{ end }}
{{- end }}

{{- define "herald.listenerDatabaseUrlKey" -}}
{{- if .Values.secret.create }}
{{- if .Values.secret.listenerDatabaseUrl }}HERALD_LISTENER_DATABASE_URL{{ end }}
{{- else }}
{{- .Values.existingSecret.listenerDatabaseUrlKey }}
{{- end }}
{{- end }}

{{- define "herald.jwtSecretKey" -}}
{{- if not .Values.jwtPublicKey.enabled }}
{{- if .Values.secret.create }}HERALD_JWT_SECRET{{ else }}{{ .Values.existingSecret.jwtSecretKey }}{{ end }}
{{- end }}
{{- end }}

{{/*
The Secret holding the JWT public key.
*/}}
{{- define "herald.jwtPublicKeySecretName" -}}
{{- default (printf "%s-jwt-public-key" (include "herald.fullname" .)) .Values.jwtPublicKey.existingSecret }}
{{- end }}

{{/*
The path Herald reads the JWT public key from.
*/}}
{{- define "herald.jwtPublicKeyFile" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.jwtPublicKey.mountPath) .Values.jwtPublicKey.key }}
{{- end }}

{{/*
The pod's termination grace period. It must cover the pre-stop sleep plus
Herald's drain, or the kubelet kills replicas mid-drain: an explicit value
that does not is refused, null derives one with 5 s to spare.
*/}}
{{- define "herald.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int .Values.config.shutdownGraceSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 5 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than preStopSleepSeconds (%d) + config.shutdownGraceSeconds (%d) = %d, or the kubelet kills Herald before it has drained; raise it, lower the drain, or set it to null to derive it" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds) (int .Values.config.shutdownGraceSeconds) $drain) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Rejects value combinations that would deploy a broken or unsafe Herald.
Included by the Deployment, so every render runs it.
*/}}
{{- define "herald.validate" -}}
{{- if and .Values.secret.create .Values.existingSecret.name }}
{{- fail "set either secret.create (the chart creates the Secret) or existingSecret.name (you provide it), not both" }}
{{- end }}
{{- if and .Values.secret.create (not .Values.secret.databaseUrl) }}
{{- fail "secret.create is true but secret.databaseUrl is empty: Herald needs a PostgreSQL URL (without one it would run an in-memory store per replica)" }}
{{- end }}
{{- if and (not .Values.secret.create) (not .Values.existingSecret.databaseUrlKey) }}
{{- fail "existingSecret.databaseUrlKey is empty: name the key of the Secret that holds DATABASE_URL" }}
{{- end }}
{{- if .Values.secret.create }}
{{- if and .Values.secret.jwtSecret .Values.jwtPublicKey.enabled }}
{{- fail "set exactly one token verification key: secret.jwtSecret (HS256) or jwtPublicKey.enabled (RS256/ES256), not both" }}
{{- end }}
{{- if not (or .Values.secret.jwtSecret .Values.jwtPublicKey.enabled) }}
{{- fail "no token verification key: set secret.jwtSecret (HS256, at least 32 bytes) or enable jwtPublicKey" }}
{{- end }}
{{- if and .Values.secret.jwtSecret (lt (len .Values.secret.jwtSecret) 32) }}
{{- fail "secret.jwtSecret must be at least 32 bytes" }}
{{- end }}
{{- else }}
{{- if or .Values.secret.databaseUrl .Values.secret.listenerDatabaseUrl .Values.secret.jwtSecret }}
{{- fail "secret.databaseUrl, secret.listenerDatabaseUrl and secret.jwtSecret are only used with secret.create: true; put them in your existing Secret instead" }}
{{- end }}
{{- if and (not .Values.jwtPublicKey.enabled) (not .Values.existingSecret.jwtSecretKey) }}
{{- fail "no token verification key: set existingSecret.jwtSecretKey (HS256 secret in your Secret) or enable jwtPublicKey" }}
{{- end }}
{{- end }}
{{- if and .Values.jwtPublicKey.enabled (not .Values.jwtPublicKey.existingSecret) (not .Values.jwtPublicKey.pem) }}
{{- fail "jwtPublicKey.enabled needs jwtPublicKey.pem or jwtPublicKey.existingSecret" }}
{{- end }}
{{- if and .Values.migration.enabled .Values.migration.useListenerDatabaseUrl (not (include "herald.listenerDatabaseUrlKey" .)) }}
{{- fail "migration.useListenerDatabaseUrl needs a listener URL: secret.listenerDatabaseUrl, or existingSecret.listenerDatabaseUrlKey" }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq (toString .name) "HERALD_DEV" }}
{{- fail "extraEnv must not set HERALD_DEV: development mode uses a publicly known token secret" }}
{{- end }}
{{- if eq (toString .name) "HERALD_SHUTDOWN_GRACE" }}
{{- fail "extraEnv must not set HERALD_SHUTDOWN_GRACE: set config.shutdownGraceSeconds, which the termination grace period is checked against" }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" .Values.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage" }}
{{- end }}
{{- $_ := include "herald.terminationGracePeriodSeconds" . }}
{{- end }}
