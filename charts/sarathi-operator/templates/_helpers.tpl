{{- define "sarathi-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release name, suffixed with the chart's unless it already contains it. */}}
{{- define "sarathi-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sarathi-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sarathi-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sarathi-operator.labels" -}}
{{ include "sarathi-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sarathi
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "sarathi-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sarathi-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
What the operator touches, and nothing more: the same rules as operator/deploy/rbac.yaml (a
test keeps them equal), granted cluster-wide or in each watched namespace.
*/}}
{{- define "sarathi-operator.rules" -}}
# The resource: watched by kopf, which also keeps its bookkeeping in annotations.
- apiGroups: [serving.sarathi.dev]
  resources: [sarathideployments]
  verbs: [get, list, watch, patch]
- apiGroups: [serving.sarathi.dev]
  resources: [sarathideployments/status]
  verbs: [patch]
# Children carry blockOwnerDeletion, which clusters enforcing owner-reference permissions
# allow only to whoever may update the owner's finalizers.
- apiGroups: [serving.sarathi.dev]
  resources: [sarathideployments/finalizers]
  verbs: [update]
# Children: written by server-side apply, watched for drift and status, overwritten when
# another writer changed them beyond what apply restores, pruned when the plan drops them.
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, update, patch]
# The model cache of an hf:// source: the claim (when the spec sizes it) and the Job that
# downloads into it, watched for its completion.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, create, update, patch, delete]
# The Gateway API Inference Extension's pool over the serving pods, where its CRD is installed.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, list, create, update, patch, delete]
# Multi-pod replicas as LeaderWorkerSet groups, where its CRD is installed; watched for readiness.
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, watch, create, update, patch, delete]
# The admin token Secret is read by name, never listed or watched.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, update, patch]
# Engine pods: found for live settings changes and deleted to restart a multi-pod replica.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
