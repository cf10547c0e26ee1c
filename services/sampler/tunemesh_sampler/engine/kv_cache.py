"""The decode loop's KV cache: per layer, keys and values in buffers reserved for the whole
generation, written in place.

transformers' `DynamicLayer` appends each step's keys with `torch.cat`, copying the whole
cache every step: O(T^2) bytes over a generation (64 rows of SmolLM2 at 2,048 positions:
~6 GB copied per step; one layer's update measured 118 ms there, 0.07 ms in place, and
8 ms vs 0.2 ms at 128 positions). A `ReservedLayer` keeps the filled positions at the front of a
buffer with room for the tokens still to come (`reserve`), so a step writes one position;
running out of room doubles the buffer (amortised O(1)). Reading `keys` / `values` gives
the filled part as a view.

Every row lies from index 0. A prefill appends its (right-padded) rows' positions; a decode
step writes each row's one new position at that row's own length (`write_at`), so rows of
different lengths share the buffer without left padding, as the trainer lays them out.
Positions past a row's length hold zeros or its padding, which attention masks by position.

Rows joining and leaving still go through `keys` / `values` (the engine selects rows and
pads caches after their tokens to merge them): assigning a tensor adopts it as a full
buffer, and the engine reserves room again after each such edit.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class _Slab:
    """One buffer [rows, heads, capacity, head_dim] whose first `length` positions are filled."""

    def __init__(self, filled: torch.Tensor) -> None:
        self.buffer, self.length = filled, filled.shape[-2]

    @property
    def filled(self) -> torch.Tensor:
        return self.buffer[..., : self.length, :]

    def reserve(self, length: int) -> None:
        if self.buffer.shape[-2] >= length:
            return
        shape = list(self.buffer.shape)
        shape[-2] = length
        grown = self.buffer.new_zeros(shape)  # never garbage: masked positions still meet a matmul
        grown[..., : self.length, :] = self.filled
        self.buffer = grown

    def write_rows(self, at_b: torch.Tensor, states: torch.Tensor) -> None:
        """Row b's one new position (states [B, H, 1, D]) at index at_b[b]."""
        end = int(at_b.max()) + 1
        if end > self.buffer.shape[-2]:
            self.reserve(max(end, 2 * self.buffer.shape[-2]))
        self.buffer[torch.arange(len(at_b), device=at_b.device), :, at_b] = states[:, :, 0]
        self.length = max(self.length, end)

    def append(self, states: torch.Tensor) -> None:
        end = self.length + states.shape[-2]
        if end > self.buffer.shape[-2]:
            self.reserve(max(end, 2 * self.buffer.shape[-2]))
        self.buffer[..., self.length : end, :] = states
        self.length = end


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are `_Slab`s."""

    def __init__(self) -> None:
        self._slabs: dict[str, _Slab | None] = {"keys": None, "values": None}
        self.write_at: torch.Tensor | None = None  # per-row index of the next position (decode steps)
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._read("keys")

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._adopt("keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        return self._read("values")

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._adopt("values", value)

    @property
    def capacity(self) -> int:
        """Positions the key buffer holds room for (0 when empty)."""
        slab = self._slabs["keys"]
        return 0 if slab is None else slab.buffer.shape[-2]

    def _read(self, which: str) -> torch.Tensor | None:
        slab = self._slabs[which]
        return None if slab is None else slab.filled

    def _adopt(self, which: str, value: torch.Tensor | None) -> None:
        """`value` becomes the whole slab (transformers' empty 1-D placeholder: none)."""
        self._slabs[which] = _Slab(value) if value is not None and value.dim() == 4 else None

    def reserve(self, length: int) -> None:
        """Room for `length` positions (a copy only if a buffer is smaller)."""
        for slab in self._slabs.values():
            if slab is not None:
                slab.reserve(length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for which, states in (("keys", key_states), ("values", value_states)):
            slab = self._slabs[which]
            if slab is None:
                self._slabs[which] = _Slab(states.clone())
            elif self.write_at is not None:
                slab.write_rows(self.write_at, states)
            else:
                slab.append(states)
        return self.keys, self.values


def reserved_cache(config) -> DynamicCache:
    """A cache of ReservedLayers for a model whose layers all attend fully (the engine's
    row editing needs that); sliding-window models keep transformers' layers."""
    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [ReservedLayer() for _ in cache.layers]
    return cache


def write_at(cache: DynamicCache, lengths_b: torch.Tensor) -> None:
    """The next forward (one token per row) writes row b's position at lengths_b[b]."""
    for layer in cache.layers:
        if not isinstance(layer, ReservedLayer):
            raise TypeError("per-row cache writes need ReservedLayer layers")
        layer.write_at = lengths_b


def reserve(cache: DynamicCache, length: int) -> None:
    """Room for `length` positions in every layer that can reserve."""
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer):
            layer.reserve(length)
