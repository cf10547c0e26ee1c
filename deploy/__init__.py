"""Deployment tooling: the chart renderer (`python -m deploy.chart`) and its template subset."""
