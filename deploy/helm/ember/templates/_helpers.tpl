{{- define "ember.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ember.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{/* Labels of every object, less app.kubernetes.io/component, which each object adds. */}}
{{- define "ember.commonLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "ember.labels" -}}
{{ include "ember.commonLabels" . }}
app.kubernetes.io/component: server
{{- end -}}

{{/* A value that may come as a number, as a string: Helm reads numbers in values files as
float64, which print as 2.0240101e+07; a whole one prints as an integer. */}}
{{- define "ember.str" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* The model after the preset is applied: name, dir, source, repoId, revision (YAML). */}}
{{- define "ember.model" -}}
{{- $m := .Values.model -}}
{{- $p := dict -}}
{{- if ne $m.preset "custom" -}}
{{- $p = index .Values.presets $m.preset | default dict -}}
{{- if not $p -}}
{{- fail (printf "model.preset %q is not in presets (known: %s, or custom)" $m.preset (keys .Values.presets | sortAlpha | join ", ")) -}}
{{- end -}}
{{- end -}}
{{- $name := $m.name | default $p.name -}}
{{- $dir := $m.dir | default $p.dir | default $name -}}
{{- $repo := $m.repoId | default (index $p $m.source) -}}
{{- if not $name -}}{{- fail "model.name is required when model.preset is custom" -}}{{- end -}}
{{- if and (not $repo) (ne .Values.pull.mode "none") -}}
{{- fail (printf "model.repoId is required: pull.mode is %s and there is no repository to pull" .Values.pull.mode) -}}
{{- end -}}
name: {{ $name | quote }}
dir: {{ $dir | quote }}
source: {{ $m.source | quote }}
repoId: {{ $repo | default "" | quote }}
revision: {{ include "ember.str" ($m.revision | default "") | quote }}
path: {{ printf "%s/%s" (trimSuffix "/" .Values.storage.mountPath) $dir | quote }}
{{- end -}}

{{- define "ember.claimName" -}}
{{- .Values.storage.existingClaim | default (printf "%s-models" (include "ember.fullname" .)) -}}
{{- end -}}

{{- define "ember.image" -}}
{{- /* A tag that is set is used as it is; the default, appVersion, gets "-cpu" for gpu: 0. */ -}}
{{- $tag := include "ember.str" (.Values.image.tag | default "") -}}
{{- if not $tag -}}
{{- $tag = .Chart.AppVersion -}}
{{- if eq (int .Values.gpu) 0 -}}{{- $tag = printf "%s-cpu" $tag -}}{{- end -}}
{{- end -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "ember.apiKeySecret" -}}
{{- .Values.apiKey.existingSecret | default (printf "%s-api-key" (include "ember.fullname" .)) -}}
{{- end -}}

{{/* The `ember pull` container (initContainer or Job), writing into the model volume. */}}
{{- define "ember.pullContainer" -}}
{{- $model := include "ember.model" . | fromYaml -}}
- name: pull
  image: {{ include "ember.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["ember"]
  args:
    - pull
    - {{ $model.repoId | quote }}
    - --source
    - {{ $model.source | quote }}
    {{- if $model.revision }}
    - --revision
    - {{ $model.revision | quote }}
    {{- end }}
    - --dir
    - {{ $model.path | quote }}
    {{- if eq .Values.pull.mode "job" }}
    # A failure's reason, left for the server pods waiting on the folder to show.
    - --mark-failure
    {{- end }}
  env:
    {{- if .Values.pull.tokenSecret.name }}
    - name: {{ ternary "HF_TOKEN" "MODELSCOPE_API_TOKEN" (eq $model.source "huggingface") }}
      valueFrom:
        secretKeyRef:
          name: {{ .Values.pull.tokenSecret.name }}
          key: {{ .Values.pull.tokenSecret.key }}
    {{- end }}
    {{- with .Values.pull.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
  resources:
    {{- toYaml .Values.pull.resources | nindent 4 }}
  securityContext:
    {{- include "ember.containerSecurity" . | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.storage.mountPath }}
      {{- with .Values.storage.subPath }}
      subPath: {{ . }}
      {{- end }}
{{- end -}}

{{/* With ember.containerSecurity, what the "restricted" Pod Security Standard asks. */}}
{{- define "ember.podSecurity" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ember.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The pull Job's name: it hashes the Job's whole pod, which cannot change in place. */}}
{{- define "ember.pullJobName" -}}
{{- $pod := include "ember.pullJobPod" . -}}
{{- printf "%s-pull" (include "ember.fullname" .) | trunc 54 | trimSuffix "-" }}-{{ $pod | sha256sum | trunc 8 }}
{{- end -}}

{{/* A shell pattern for the first line of the mark `ember pull` leaves in a folder it has
filled: REPO@COMMIT from Hugging Face (any commit, unless a full one is pinned), REPO@REVISION
from ModelScope (master when none is given). */}}
{{- define "ember.pulledMark" -}}
{{- $model := include "ember.model" . | fromYaml -}}
{{- if eq $model.source "modelscope" -}}
{{- printf "%s@%s" $model.repoId ($model.revision | default "master") -}}
{{- else if regexMatch "^[0-9a-f]{40}$" $model.revision -}}
{{- printf "%s@%s" $model.repoId $model.revision -}}
{{- else -}}
{{- printf "%s@*" $model.repoId -}}
{{- end -}}
{{- end -}}

{{/* The pull Job's pod template (its name hashes all of it: a Job's pod cannot change). */}}
{{- define "ember.pullJobPod" -}}
metadata:
  labels:
    app.kubernetes.io/name: {{ .Chart.Name }}
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/component: pull
spec:
  restartPolicy: OnFailure
  securityContext:
    {{- include "ember.podSecurity" . | nindent 4 }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "ember.pullContainer" . | nindent 4 }}
  volumes:
    - name: models
      persistentVolumeClaim:
        claimName: {{ include "ember.claimName" . }}
  # Where the server pods may run (a cluster of tainted GPU nodes schedules it too), and
  # beside them: a ReadWriteOnce claim the waiting server pod holds on its node can be attached
  # nowhere else. Of the pods' own affinity only the node part applies (their anti-affinity to
  # each other would keep the Job from the very node it must share).
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  affinity:
    {{- with (.Values.affinity | default dict).nodeAffinity }}
    nodeAffinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    podAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "ember.selectorLabels" . | nindent 16 }}
{{- end -}}
