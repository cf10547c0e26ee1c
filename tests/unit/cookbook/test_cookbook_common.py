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


def test_run_recipe_trains_on_the_client_and_prints_headline_example_and_log_dir(monkeypatch, capsys):
    import argparse
    import contextlib

    seen = []

    @contextlib.contextmanager
    def fake_client(args):
        yield f"client for {args.address}"

    def fake_train(service, args):
        seen.append((service, args.steps))
        return {"score": 0.5, "log_dir": "/runs/x", "seconds": 12.4,
                "example": {"prompt": "2+2?", "answer": "4", "before": "5", "after": "4"}}

    monkeypatch.setattr(common, "service_client", fake_client)
    recipe = argparse.ArgumentParser()
    recipe.add_argument("--address")
    recipe.add_argument("--steps", type=int, default=1)
    code = common.run_recipe(recipe, fake_train, lambda s: [f"score {s['score']:.0%}"], ["--address", "h:1", "--steps", "3"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and seen == [("client for h:1", 3)]
    assert out[0] == "score 50%" and out[1] == "2+2?" and "after:    '4'" in out[4]
    assert out[-1] == "metrics and plots in /runs/x (12 s)"
