"""cookbook/common.py: completion datums, metrics log, example text."""

from __future__ import annotations

import json

import pytest

from cookbook import common


def test_datum_shifts_targets_and_scores_only_the_completion():
    d = common.datum([1, 2, 3], [4, 5], weights=1.0, advantages=[0.5, -1.0])
    assert d.model_input.to_ints() == [1, 2, 3, 4]
    assert d.loss_fn_inputs["target_tokens"].tolist() == [2, 3, 4, 5]
    assert d.loss_fn_inputs["weights"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert d.loss_fn_inputs["advantages"].tolist() == [0.0, 0.0, 0.5, -1.0]


@pytest.mark.parametrize(("prompt", "completion", "extra"), [
    ([], [1], {}), ([1], [], {}), ([1, 2], [3, 4], {"logprobs": [-1.0]})])
def test_datum_refuses_empty_parts_and_misaligned_inputs(prompt, completion, extra):
    with pytest.raises(ValueError):
        common.datum(prompt, completion, **extra)


def test_metrics_log_writes_jsonl_series_and_a_plot(tmp_path):
    log = common.MetricsLog(tmp_path)
    log.write(0, eval=2.0)
    log.write(1, loss=1.5)
    log.write(2, loss=float("nan"), eval=1.0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["loss"] is None
    assert log.series("eval") == ([0, 2], [2.0, 1.0])
    assert log.plot("loss", ["loss", "eval"]).stat().st_size > 0


def test_example_text_names_the_prompt_answer_and_both_replies():
    text = common.example_text({"prompt": "What is 2 + 2?", "answer": "4", "before": "Two plus", "after": "4"})
    assert text.splitlines() == ["What is 2 + 2?", "  expected: 4", "  before:   'Two plus'", "  after:    '4'"]
