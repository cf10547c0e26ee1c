"""Provenance spans: where a Datum's tokens came from, as Tinker records them.

`Datum.with_provenance` attaches them (checking that they tile the datum), so code that
builds them runs (tinker-cookbook's RL attaches them to every datum). They only annotate:
no tunemesh loss reads them (Tinker's `stable_reinforce`, the loss that does, is not
offered), so they stay on the client and are not sent (see `tunemesh._wire`).
"""

from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan:
    """Positions `[offset, offset + length)` of the prompt of the sampling request that
    returned sequence `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan:
    """Positions `[offset, offset + length)` of the tokens sampled for `sequence_id`."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        _check_span(self)


ProvenanceSpan = Union[PromptProvenanceSpan, SampledProvenanceSpan]
ProvenanceSpans = list[ProvenanceSpan]
"""Consecutive spans tiling one Datum field, in order."""


def check_tiling(field: str, spans: ProvenanceSpans, length: int) -> None:
    """ValueError unless `spans` are spans whose lengths add up to `length`."""
    for span in spans:
        if not isinstance(span, (PromptProvenanceSpan, SampledProvenanceSpan)):
            raise TypeError(f"{field} spans must be provenance spans, got {type(span).__name__}")
    total = sum(span.length for span in spans)
    if total != length:
        raise ValueError(f"{field} spans cover {total} positions, but it has {length}")


def _check_span(span: ProvenanceSpan) -> None:
    name = type(span).__name__
    if not span.sequence_id:
        raise ValueError(f"{name}.sequence_id must not be empty")
    if span.offset < 0 or span.length < 0:
        raise ValueError(f"{name} needs offset >= 0 and length >= 0, got {span.offset} and {span.length}")
