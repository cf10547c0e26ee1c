"""Service log lines end in their context: the `extra=` keys (tenant, run, operation,
node) and, inside an RPC, the tenant being served."""

from __future__ import annotations

import io
import logging

from tunemesh_common.service import rpc


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(rpc.ContextFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(rpc._TenantOfTheCall())
    logger = logging.getLogger("test_log_context")
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.INFO
    return logger


def test_a_line_ends_in_the_context_its_record_carries():
    out = io.StringIO()
    log = _logger(out)
    log.info("moving %s", "runs/a", extra={"run": "runs/a", "node": "trainer-1"})
    log.info("no context here")
    assert out.getvalue().splitlines() == [
        "INFO test_log_context: moving runs/a [run=runs/a node=trainer-1]",
        "INFO test_log_context: no context here",
    ]


def test_inside_an_rpc_the_tenant_being_served_is_added():
    out = io.StringIO()
    log = _logger(out)
    token = rpc._tenant.set("tenant-a")
    try:
        log.warning("run created", extra={"run": "runs/b"})
        log.warning("explicit", extra={"tenant": "tenant-z"})
    finally:
        rpc._tenant.reset(token)
    log.warning("outside")
    assert out.getvalue().splitlines() == [
        "WARNING test_log_context: run created [tenant=tenant-a run=runs/b]",
        "WARNING test_log_context: explicit [tenant=tenant-z]",
        "WARNING test_log_context: outside",
    ]


def test_a_node_process_puts_its_node_on_every_line_unless_the_record_names_one():
    out = io.StringIO()
    log = _logger(out)
    log.handlers[0].addFilter(rpc._ThisNode("sampler-3"))
    log.info("adapter loaded", extra={"run": "runs/c"})
    log.info("about another node", extra={"node": "trainer-0"})
    assert out.getvalue().splitlines() == [
        "INFO test_log_context: adapter loaded [run=runs/c node=sampler-3]",
        "INFO test_log_context: about another node [node=trainer-0]",
    ]
