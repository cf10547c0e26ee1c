"""PromQL the dashboards share: counters as rates or increases, histograms as quantiles or means."""

from __future__ import annotations

WINDOW = "$__rate_interval"
MESH_JOBS = 'job=~"scheduler|trainer|sampler|checkpoint"'
NO_HEALTH = 'grpc_service!="grpc.health.v1.Health"'
# Codes that say the service failed, not its caller (deploy/prometheus/README.md).
SERVER_ERROR_CODES = "UNKNOWN|INTERNAL|UNAVAILABLE|DATA_LOSS|DEADLINE_EXCEEDED"


def rate(metric: str, selector: str = "", by: str = "") -> str:
    """`sum by (by) (rate(metric{selector}[window]))`: per second, summed over series."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[{WINDOW}]))"


def in_range(metric: str, selector: str = "", by: str = "") -> str:
    """A counter's increase over the dashboard's time range, summed over series."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (increase({metric}{{{selector}}}[$__range]))"


def quantile(q: float, histogram: str, selector: str = "", by: str = "") -> str:
    """The `q` quantile of a histogram over the window, per `by` group."""
    grouping = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({histogram}_bucket{{{selector}}}[{WINDOW}])))"


def mean(histogram: str, selector: str = "", by: str = "") -> str:
    """The mean observation of a histogram over the window, per `by` group."""
    return f"{rate(histogram + '_sum', selector, by)} / {rate(histogram + '_count', selector, by)}"


def error_ratio(selector: str, by: str) -> str:
    """Server-error RPCs over all RPCs, health checks left out; 0 (not empty) while none failed."""
    scope = f"{selector}, {NO_HEALTH}" if selector else NO_HEALTH
    calls = rate("tunemesh_rpc_handled_total", scope, by)
    errors = rate("tunemesh_rpc_handled_total", f'{scope}, grpc_code=~"{SERVER_ERROR_CODES}"', by)
    return f"({errors} or 0 * {calls}) / {calls}"
