{{/*
Chart name, truncated to 63 characters (the DNS-1123 label limit).
*/}}
{{- define "meshline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name when it
already contains the chart name. Truncated to 63 characters.
*/}}
{{- define "meshline.fullname" -}}
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
Name for cluster-scoped objects (ClusterRole, ClusterRoleBinding). It carries
the release namespace so that two releases with the same name in different
namespaces (typical with watchNamespace) do not fight over one object.
*/}}
{{- define "meshline.clusterName" -}}
{{- printf "%s-%s" (include "meshline.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{/*
Chart label value: <name>-<version>.
*/}}
{{- define "meshline.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable across upgrades (a Deployment's selector is immutable).
*/}}
{{- define "meshline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Standard labels for every object of the chart.
*/}}
{{- define "meshline.labels" -}}
helm.sh/chart: {{ include "meshline.chart" . }}
{{ include "meshline.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: meshline
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "meshline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Controller image reference: repository:tag, the tag defaulting to appVersion.
*/}}
{{- define "meshline.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Worker image reference. Each empty field falls back to the controller image's.
*/}}
{{- define "meshline.workerImage" -}}
{{- $repository := .Values.workerImage.repository | default .Values.image.repository }}
{{- $tag := .Values.workerImage.tag | default .Values.image.tag | default .Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
Name of the coordination.k8s.io Lease used for leader election.
*/}}
{{- define "meshline.leaseName" -}}
{{- printf "%s-leader" (include "meshline.fullname" .) }}
{{- end }}

{{/*
RBAC rules the controller needs in the namespaces it watches. Rendered into a
ClusterRole (watchNamespace empty) or a Role in watchNamespace. No wildcards.
*/}}
{{- define "meshline.watchRules" -}}
- apiGroups: ["sync.meshline.io"]
  resources: ["syncflows", "synccontracts", "ownershiprosters"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["sync.meshline.io"]
  resources: ["syncflows/status", "synccontracts/status", "ownershiprosters/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  # delete: a flow's canary Deployment goes when its rollout is promoted or aborted
  # (its ConfigMap and status Service follow by owner-reference garbage collection).
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# delete: the budget goes when a flow drops to one replica; everything else goes by
# owner-reference garbage collection.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# No delete: a worker's ledger volume must outlive the worker.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Read: the controller checks that referenced Secrets exist and carry the keys
# their connector reads. create: each flow's worker bearer token, created once
# (never patched, updated or deleted by the controller; owner references remove
# it with the flow). The controller never writes a user's Secret.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create"]
# Contract revisions: one immutable ControllerRevision per accepted content,
# owned by the SyncContract; delete: revisions pruned beyond the history limit
# (never the active one).
- apiGroups: ["apps"]
  resources: ["controllerrevisions"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Preflight replay Jobs, one per bound flow and candidate; delete: the running
# Job of a candidate that an edit replaced (finished ones go by their TTL).
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Reconciliation audit CronJobs, one per flow, owned by the flow; patch: a
# roster's schedule change; delete: a flow whose sides the audit cannot read.
- apiGroups: ["batch"]
  resources: ["cronjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# A finished preflight Job's pod carries the replay report in its termination
# message. List only (by the Job's label), no watch, no get of pod specs' data.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Which worker pods each flow's status Service publishes, so the controller
# reads /status from every pod. Only list and watch: the cache is filled by a
# watch and nothing reads one slice by name.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
{{- if eq .Values.networkPolicy.perFlow.mode "on" }}
# networkPolicy.perFlow.mode: "on". Each flow's NetworkPolicy, applied like the
# other children; delete: the orphan goes when a later upgrade turns it off.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- else if eq .Values.networkPolicy.perFlow.mode "clean-up" }}
# networkPolicy.perFlow.mode: "clean-up". Find and delete the per-flow
# NetworkPolicies made while the switch was on; never create or change one.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "delete"]
{{- end }}
{{- if .Values.controller.statusViaProxy }}
# controller.statusViaProxy: true. Broad: GET through the API server proxy to
# any pod in scope (each worker pod's /status is read through it); with
# opsPage.enabled also POST (create), for the page's approvals and replays.
- apiGroups: [""]
  resources: ["pods/proxy"]
  verbs: {{ if .Values.opsPage.enabled }}["get", "create"]{{ else }}["get"]{{ end }}
{{- end }}
{{- end }}

{{/*
Rule to read CustomResourceDefinitions (wait for Established at start-up).
*/}}
{{- define "meshline.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
The ingress rules of a worker NetworkPolicy (chart-wide or, through the
controller's flags, per flow): the webhook port from the ingress namespaces,
the operations port from the controller's pods, the metrics namespaces and the
API server's CIDRs.
*/}}
{{- define "meshline.workerIngressRules" -}}
{{- with .Values.networkPolicy.webhookFromNamespaces }}
- from:
    - namespaceSelector:
        matchExpressions:
          - key: kubernetes.io/metadata.name
            operator: In
            values:
              {{- toYaml . | nindent 14 }}
  ports:
    - port: webhook
      protocol: TCP
{{- end }}
- from:
    - namespaceSelector:
        matchExpressions:
          - key: kubernetes.io/metadata.name
            operator: In
            values:
              - {{ .Release.Namespace }}
      podSelector:
        matchLabels:
          {{- include "meshline.selectorLabels" . | nindent 10 }}
    # Preflight replay pods read an embedded ledger's recent records through the
    # worker's operations API (with the flow's token).
    - podSelector:
        matchLabels:
          app.kubernetes.io/component: preflight
          app.kubernetes.io/managed-by: meshline-controller
    {{- with .Values.networkPolicy.metricsFromNamespaces }}
    - namespaceSelector:
        matchExpressions:
          - key: kubernetes.io/metadata.name
            operator: In
            values:
              {{- toYaml . | nindent 14 }}
    {{- end }}
    {{- range .Values.networkPolicy.apiServerCIDRs }}
    - ipBlock:
        cidr: {{ . | quote }}
    {{- end }}
  ports:
    - port: ops
      protocol: TCP
{{- end }}

{{/*
The controller's own pod labels as `--controller-pod-labels` wants them.
*/}}
{{- define "meshline.controllerPodLabelsArg" -}}
app.kubernetes.io/name={{ include "meshline.name" . }},app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=controller
{{- end }}

{{/*
Name of the sign-off ValidatingAdmissionPolicy and its binding (cluster-scoped,
so it carries the release namespace like meshline.clusterName).
*/}}
{{- define "meshline.signOffPolicyName" -}}
{{- printf "%s-sign-offs" (include "meshline.clusterName" .) | trunc 253 | trimSuffix "-" }}
{{- end }}
