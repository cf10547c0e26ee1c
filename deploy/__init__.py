"""Deployment tooling: `deploy.helm` renders and lints the Helm chart `deploy/k8s`; `deploy.dashboards` generates
the Grafana dashboards."""
