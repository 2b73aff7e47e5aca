{{/* Names, labels, the image, and the security settings every pod of this chart shares. */}}

{{- define "sw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sw.fullname" -}}
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

{{- define "sw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sitewarden
{{- end -}}

{{- define "sw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sw.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* registry/repository[:tag][@digest]; a digest pins the image, the tag is then informative only. */}}
{{- define "sw.image" -}}
{{- $registry := .Values.global.imageRegistry | default .Values.image.registry -}}
{{- $repo := .Values.image.repository -}}
{{- if $registry -}}{{- $repo = printf "%s/%s" $registry $repo -}}{{- end -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{- define "sw.imagePullSecrets" -}}
{{- $secrets := concat (.Values.global.imagePullSecrets | default list) (.Values.imagePullSecrets | default list) | uniq -}}
{{- if $secrets }}
imagePullSecrets:
{{- range $secrets }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "sw.openshift" -}}
{{- if or .Values.openshift .Values.global.openshift -}}true{{- end -}}
{{- end -}}

{{/* Restricted Pod Security; in OpenShift mode no fixed ids (restricted-v2 assigns them). */}}
{{- define "sw.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  {{- if not (include "sw.openshift" .) }}
  runAsUser: {{ .Values.securityContext.runAsUser }}
  runAsGroup: {{ .Values.securityContext.runAsGroup }}
  fsGroup: {{ .Values.securityContext.fsGroup }}
  fsGroupChangePolicy: OnRootMismatch
  {{- end }}
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "sw.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  {{- if not (include "sw.openshift" .) }}
  runAsUser: {{ .Values.securityContext.runAsUser }}
  runAsGroup: {{ .Values.securityContext.runAsGroup }}
  {{- end }}
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Scheduling and pod metadata the user may set. */}}
{{- define "sw.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* The private CA bundle (ConfigMap) and the HTTPS proxy, for every container. */}}
{{- define "sw.caPath" -}}/etc/sitewarden/ca/{{ .Values.caBundle.key }}{{- end -}}

{{- define "sw.commonEnv" -}}
- name: HOME
  value: /tmp
- name: FLWR_TELEMETRY_ENABLED
  value: "0"
- name: FLWR_DISABLE_UPDATE_CHECK
  value: "1"
{{- if .Values.caBundle.existingConfigMap }}
- name: SSL_CERT_FILE
  value: {{ include "sw.caPath" . }}
{{- end }}
{{- if .Values.proxy.httpsProxy }}
- name: HTTPS_PROXY
  value: {{ .Values.proxy.httpsProxy | quote }}
- name: https_proxy
  value: {{ .Values.proxy.httpsProxy | quote }}
- name: NO_PROXY
  value: {{ .Values.proxy.noProxy | quote }}
- name: no_proxy
  value: {{ .Values.proxy.noProxy | quote }}
{{- end }}
{{- if .Values.logFormat }}
- name: SITEWARDEN_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "sw.caVolume" -}}
{{- if .Values.caBundle.existingConfigMap }}
- name: ca-bundle
  configMap:
    name: {{ .Values.caBundle.existingConfigMap }}
    items:
      - key: {{ .Values.caBundle.key }}
        path: {{ .Values.caBundle.key }}
{{- end }}
{{- end -}}

{{- define "sw.caMount" -}}
{{- if .Values.caBundle.existingConfigMap }}
- name: ca-bundle
  mountPath: /etc/sitewarden/ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* A test pod: the same image and security, no volumes but /tmp and the CA. */}}
{{- define "sw.testPod" -}}
{{- $ctx := index . 0 -}}
{{- $name := index . 1 -}}
{{- $args := index . 2 -}}
{{- $volumes := index . 3 -}}
{{- $mounts := index . 4 -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "sw.fullname" $ctx }}-{{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "sw.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: test
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  serviceAccountName: {{ include "sw.serviceAccountName" $ctx }}
  {{- include "sw.imagePullSecrets" $ctx | nindent 2 }}
  {{- include "sw.podSecurityContext" $ctx | nindent 2 }}
  {{- include "sw.scheduling" $ctx | nindent 2 }}
  containers:
    - name: test
      image: {{ include "sw.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args:
        {{- toYaml $args | nindent 8 }}
      env:
        {{- include "sw.commonEnv" $ctx | nindent 8 }}
      {{- include "sw.containerSecurityContext" $ctx | nindent 6 }}
      resources:
        {{- toYaml $ctx.Values.tests.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- include "sw.caMount" $ctx | nindent 8 }}
        {{- with $mounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- include "sw.caVolume" $ctx | nindent 4 }}
    {{- with $volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The controller's TLS Secret: the user's, or the one cert-manager writes. */}}
{{- define "sw.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "sw.fullname" .)) -}}
{{- end -}}

{{/* The database URL is a secret: mounted as a file and named by SITEWARDEN_DATABASE_URL_FILE. */}}
{{- define "sw.databaseEnv" -}}
{{- if eq .Values.database.type "postgresql" }}
- name: SITEWARDEN_DATABASE_URL_FILE
  value: /etc/sitewarden/database/{{ .Values.database.existingSecretKey }}
{{- end }}
{{- end -}}

{{- define "sw.databaseMount" -}}
{{- if eq .Values.database.type "postgresql" }}
- name: database
  mountPath: /etc/sitewarden/database
  readOnly: true
{{- end }}
{{- end -}}

{{- define "sw.databaseVolume" -}}
{{- if eq .Values.database.type "postgresql" }}
- name: database
  secret:
    secretName: {{ .Values.database.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.database.existingSecretKey }}
        path: {{ .Values.database.existingSecretKey }}
{{- end }}
{{- end -}}
