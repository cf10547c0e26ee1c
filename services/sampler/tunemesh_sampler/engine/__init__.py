"""Sampling engines behind the `SamplingEngine` protocol; heavy imports happen in the factories."""

from __future__ import annotations

from tunemesh_sampler.engine.protocol import SamplingEngine

__all__ = ["SamplingEngine"]
