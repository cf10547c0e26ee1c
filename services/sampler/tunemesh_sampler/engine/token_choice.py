"""How the sampler picks each row's next token: greedy, or temperature + top-k + top-p
from the row's own generator, so a row's tokens depend on its request's seed and its
sample index only, never on the rest of the batch."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence

import torch

from tunemesh_sampler.domain import SamplingSpec


class TokenChooser:
    """Per-row greedy / temperature + top-k + top-p choice of the next token."""

    def __init__(self, specs: Sequence[SamplingSpec], device: torch.device) -> None:
        self._device = device
        self._greedy_b = torch.tensor([s.temperature <= 0 for s in specs], device=device)
        self._temperature_b = torch.tensor([max(s.temperature, 1e-5) if s.temperature > 0 else 1.0 for s in specs],
                                           dtype=torch.float32, device=device)
        self._top_k_b = torch.tensor([s.top_k if s.top_k > 0 else 2**62 for s in specs], device=device)
        self._top_p_b = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device)

    def choose(self, logits_bv: torch.Tensor,
               generators: Sequence[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next token of every row, and its logprob under the raw logits. A sampled row
        draws one uniform from its generator (None: a greedy or finished row draws none)."""
        tokens_b = logits_bv.argmax(dim=-1)
        if not bool(self._greedy_b.all()):
            tokens_b = torch.where(self._greedy_b, tokens_b, self._sample(logits_bv, generators))
        logprobs_b = torch.log_softmax(logits_bv, dim=-1).gather(-1, tokens_b[:, None]).squeeze(-1)
        return tokens_b, logprobs_b

    def _sample(self, logits_bv: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """Inverse-CDF sampling over the top-k / top-p set, one uniform per row from its generator."""
        uniforms = [0.0 if g is None else float(torch.rand((), generator=g)) for g in generators]
        u_b = torch.tensor(uniforms, dtype=torch.float32, device=self._device)
        values_bv, order_bv = (logits_bv / self._temperature_b[:, None]).sort(dim=-1, descending=True)
        rank_v = torch.arange(values_bv.shape[-1], device=self._device)
        values_bv = values_bv.masked_fill(rank_v >= self._top_k_b[:, None], -math.inf)
        probs_bv = torch.softmax(values_bv, dim=-1)
        mass_before_bv = probs_bv.cumsum(dim=-1) - probs_bv
        probs_bv = probs_bv.masked_fill((mass_before_bv >= self._top_p_b[:, None]) & (rank_v > 0), 0.0)
        cdf_bv = probs_bv.cumsum(dim=-1)
        picks_b = torch.searchsorted(cdf_bv, (u_b * cdf_bv[:, -1])[:, None]).clamp(max=cdf_bv.shape[-1] - 1)
        return order_bv.gather(-1, picks_b).squeeze(-1)


def request_seed(spec: SamplingSpec) -> int:
    """The request's seed, or a fresh random one when it names none."""
    return secrets.randbits(63) if spec.seed is None else spec.seed


def row_generator(spec: SamplingSpec, seed: int, index: int) -> torch.Generator | None:
    """Sample `index` of a request seeded `seed`: a generator that depends on both only."""
    if spec.temperature <= 0:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
