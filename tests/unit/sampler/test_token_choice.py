"""The sampler's token choice: draws follow the tempered softmax (whole vocabulary, or the
top-k / top-p set), a row's token never depends on the rest of its batch, and a token of
probability zero is never drawn."""

from __future__ import annotations

import numpy as np
import torch

from tunemesh_sampler.domain import SamplingSpec
from tunemesh_sampler.engine.token_choice import TokenChooser, row_generator

CPU = torch.device("cpu")
LOGITS_V = torch.tensor([2.0, 0.5, -1.0, 1.5, 0.0, -3.0])


def _frequencies(spec: SamplingSpec, rows: int = 4000, rounds: int = 5) -> np.ndarray:
    """How often each token was drawn: `rows` rows per step (each its own sample index), `rounds` steps."""
    chooser = TokenChooser([spec] * rows, CPU)
    generators = [row_generator(spec, spec.seed, i) for i in range(rows)]
    counts = np.zeros(len(LOGITS_V))
    for _ in range(rounds):
        tokens_b, _ = chooser.choose(LOGITS_V.expand(rows, -1).clone(), generators)
        counts += np.bincount(tokens_b.numpy(), minlength=len(LOGITS_V))
    return counts / counts.sum()


def test_plain_temperature_draws_follow_the_tempered_softmax():
    spec = SamplingSpec(max_tokens=1, temperature=0.7, seed=11)
    want = torch.softmax(LOGITS_V / 0.7, dim=-1).numpy()
    got = _frequencies(spec)
    np.testing.assert_allclose(got, want, atol=0.015)  # 20,000 draws: ~3 standard errors


def test_top_k_and_top_p_draw_from_their_set_in_proportion():
    probs = torch.softmax(LOGITS_V, dim=-1).numpy()
    top2 = np.zeros_like(probs)
    top2[[0, 3]] = probs[[0, 3]] / probs[[0, 3]].sum()
    np.testing.assert_allclose(_frequencies(SamplingSpec(max_tokens=1, temperature=1.0, top_k=2, seed=5)), top2,
                               atol=0.015)
    # top_p 0.6: tokens 0 (0.49) and 3 (0.30) are needed to pass 0.6; the rest never drawn
    np.testing.assert_allclose(_frequencies(SamplingSpec(max_tokens=1, temperature=1.0, top_p=0.6, seed=5)), top2,
                               atol=0.015)


def test_a_row_draws_the_same_tokens_and_logprobs_whatever_shares_its_batch():
    logits_v = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    plain = SamplingSpec(max_tokens=1, temperature=1.0, seed=1)
    truncated = SamplingSpec(max_tokens=1, temperature=0.8, top_k=50, top_p=0.9, seed=2)
    greedy = SamplingSpec(max_tokens=1)
    for spec in (plain, truncated):
        alone_tokens, alone_logprobs = _draws([spec], logits_v)
        others = [greedy, SamplingSpec(max_tokens=1, temperature=1.3, seed=9), truncated, plain]
        mixed_tokens, mixed_logprobs = _draws([*others, spec, greedy], logits_v)
        assert mixed_tokens[len(others)] == alone_tokens[0]
        assert torch.equal(mixed_logprobs[len(others)], alone_logprobs[0])
        assert len(set(alone_tokens[0])) > 10  # the draws vary


def _draws(specs: list[SamplingSpec], logits_v: torch.Tensor, steps: int = 20) -> tuple[list[list[int]], torch.Tensor]:
    """Each row's tokens and logprobs over `steps` steps; every row sees the same logits and
    is sample index 0 of its spec's seed."""
    chooser = TokenChooser(specs, CPU)
    generators = [row_generator(spec, spec.seed or 0, 0) for spec in specs]
    logits_bv = logits_v.expand(len(specs), -1).clone()
    steps_out = [chooser.choose(logits_bv, generators) for _ in range(steps)]
    tokens = [list(row) for row in zip(*(t.tolist() for t, _ in steps_out))]
    return tokens, torch.stack([lp for _, lp in steps_out], dim=1)


def test_a_token_of_probability_zero_is_never_drawn_even_at_the_ends_of_the_uniform():
    chooser = TokenChooser([SamplingSpec(max_tokens=1, temperature=1.0)] * 2, CPU)
    logits_bv = torch.tensor([[-torch.inf, 0.0, 1.0, -torch.inf], [-torch.inf, 0.0, 1.0, -torch.inf]])
    picks_b = chooser._sample_plain(logits_bv, torch.tensor([0.0, 1.0 - 2**-24]), torch.tensor([0, 1]))
    assert picks_b.tolist() == [1, 2]


def test_logprobs_are_of_the_raw_logits_and_greedy_rows_take_the_argmax():
    specs = [SamplingSpec(max_tokens=1), SamplingSpec(max_tokens=1, temperature=0.5, seed=3)]
    logits_bv = torch.stack([LOGITS_V, LOGITS_V])
    tokens_b, logprobs_b = TokenChooser(specs, CPU).choose(logits_bv, [None, row_generator(specs[1], 3, 0)])
    assert int(tokens_b[0]) == 0
    want = torch.log_softmax(LOGITS_V, dim=-1)[tokens_b]
    assert torch.equal(logprobs_b, want)
