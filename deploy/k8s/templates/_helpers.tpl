{{/*
TLS (values `tls`): each role's Secret is mounted read-only at /etc/tunemesh/tls.
*/}}

{{/* The name of `role`'s TLS Secret; rendering fails naming the value when it is empty. Args: dict "root" $ "role" ROLE. */}}
{{- define "tunemesh.tlsSecret" -}}
{{- $name := index (.root.Values.tls.secrets | default dict) .role -}}
{{- if not $name -}}
{{- fail (printf "tls.enabled=true needs tls.secrets.%s: the name of a kubernetes.io/tls Secret (ca.crt, tls.crt, tls.key) holding the %s's certificate of the mesh CA (deploy/k8s/cert-manager.yaml makes one; docs/security.md). tls.enabled=false runs the mesh in plaintext: development only" .role .role) -}}
{{- end -}}
{{- $name -}}
{{- end }}

{{/* A mesh service's TLS flags: the mounted files, or --insecure=true without TLS. Arg: $. */}}
{{- define "tunemesh.tlsArgs" -}}
{{- if .Values.tls.enabled -}}
- --tls-ca=/etc/tunemesh/tls/ca.crt
- --tls-cert=/etc/tunemesh/tls/tls.crt
- --tls-key=/etc/tunemesh/tls/tls.key
{{- else -}}
- --insecure=true
{{- end -}}
{{- end }}

{{/* The volumeMounts entry of the TLS Secret (with tls.enabled). */}}
{{- define "tunemesh.tlsMount" -}}
- name: tls
  mountPath: /etc/tunemesh/tls
  readOnly: true
{{- end }}

{{/* The volumes entry of `role`'s TLS Secret (with tls.enabled); the key readable by the pod's group only. Args: dict "root" $ "role" ROLE. */}}
{{- define "tunemesh.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "tunemesh.tlsSecret" . }}
    defaultMode: 0440
{{- end }}

{{/*
A mesh service's probes. Args: dict "root" $ "port" GRPC_PORT "standby" BOOL.
With TLS, kubelet's gRPC probe (plaintext) cannot reach the service: it asks the metrics
port, /readyz (200 once serving) for startup and readiness, /healthz (200 while the process
runs) for liveness. Without TLS, grpc.health.v1 on the serving port.
`standby` (the scheduler): a standby opens no gRPC port and is never ready, so startup and
liveness ask /healthz whenever metrics are on, and readiness (the Service's routing) means
"leading": /readyz with TLS, else the leader's gRPC health.
*/}}
{{- define "tunemesh.probes" -}}
{{- $v := .root.Values -}}
{{- $http := $v.tls.enabled -}}
{{- if or $http (and .standby $v.metrics.enabled) }}
startupProbe:
  httpGet:
    path: {{ .standby | ternary "/healthz" "/readyz" }}
    port: metrics
  {{- toYaml $v.probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml $v.probes.liveness | nindent 2 }}
{{- else if not .standby }}
startupProbe:
  grpc:
    port: {{ .port }}
  {{- toYaml $v.probes.startup | nindent 2 }}
livenessProbe:
  grpc:
    port: {{ .port }}
  {{- toYaml $v.probes.liveness | nindent 2 }}
{{- end }}
readinessProbe:
{{- if $http }}
  httpGet:
    path: /readyz
    port: metrics
{{- else }}
  grpc:
    port: {{ .port }}
{{- end }}
  {{- toYaml $v.probes.readiness | nindent 2 }}
{{- end }}
