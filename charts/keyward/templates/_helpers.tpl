{{- define "keyward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyward.fullname" -}}
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

{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keyward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keyward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "keyward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keyward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Embedded SQLite needs a volume and allows one replica only. */}}
{{- define "keyward.sqlite" -}}
{{- if not .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* The verifier's pods: a name of their own, so that no operator selector (Deployment, Service, PDB, NetworkPolicy) matches them. */}}
{{- define "keyward.verifier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}-verifier
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keyward.verifier.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keyward.verifier.selectorLabels" . }}
app.kubernetes.io/component: verifier
app.kubernetes.io/part-of: {{ include "keyward.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The pods that serve the verifier: its own Deployment with PostgreSQL, the operator with embedded SQLite. */}}
{{- define "keyward.verifier.podLabels" -}}
{{- if include "keyward.sqlite" . }}
{{- include "keyward.selectorLabels" . }}
{{- else }}
{{- include "keyward.verifier.selectorLabels" . }}
{{- end }}
{{- end }}

{{/* A Deployment of its own (`keyward verifier`): the verifier is enabled and the key database is shared (PostgreSQL). */}}
{{- define "keyward.verifier.deployment" -}}
{{- if and .Values.verifier.enabled (not (include "keyward.sqlite" .)) }}true{{ end }}
{{- end }}

{{/* The verifier's Service, Deployment and other objects: <fullname>-verifier. */}}
{{- define "keyward.verifier.fullname" -}}
{{- printf "%s-verifier" (include "keyward.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyward.verifier.serviceAccountName" -}}
{{- if .Values.verifier.serviceAccount.create }}
{{- default (include "keyward.verifier.fullname" .) .Values.verifier.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.verifier.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The admissionregistration.k8s.io version of the admission objects, or nothing
to leave them out. admission.apiVersion wins when set. Otherwise the version
the cluster serves the ValidatingAdmissionPolicy kind at (a real install and
`helm template --validate` list the cluster's kinds, e.g. v1/Namespace); a
cluster that serves neither gets no admission objects (NOTES says so, and the
operator still enforces). `helm template` without a cluster knows only API
groups, not kinds: it picks by --kube-version (v1 from 1.30).
*/}}
{{- define "keyward.admission.apiVersion" -}}
{{- $api := .Capabilities.APIVersions }}
{{- if .Values.admission.apiVersion }}
{{- .Values.admission.apiVersion }}
{{- else if $api.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy" }}v1
{{- else if $api.Has "admissionregistration.k8s.io/v1beta1/ValidatingAdmissionPolicy" }}v1beta1
{{- else if not ($api.Has "v1/Namespace") }}
{{- ternary "v1" "v1beta1" (semverCompare ">=1.30-0" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}

{{/* `helm test`'s objects: a name of their own, so that no operator or verifier selector matches the selftest pod. */}}
{{- define "keyward.selftest.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "keyward.name" . }}-selftest
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: selftest
app.kubernetes.io/part-of: {{ include "keyward.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
