"""tunemesh's Grafana dashboards as code: `python -m deploy.dashboards [--check]` writes deploy/grafana/*.json."""
