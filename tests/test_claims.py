"""The arithmetic behind ``benchmarks/claims_smollm2.py``'s verdicts, on runs made up so the answer is known.

Forgetting is compared where each run's held-out loss first reaches the same level (linear interpolation
between evaluations); the greedy-answer check counts an answer right only when it names the answer as
whole words; intervals are Student's t at 95%.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def modules():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in ("claims_smollm2", "harness.training", "general_ability")}
    finally:
        sys.path.remove(str(BENCHMARKS))


def made_up_run(losses, prose, greedy=None, seed=0):
    """A run's record: held-out losses and prose losses at steps 0, 1, 2, ...; QA loss moves like prose."""
    greedy = greedy or [0.5] * len(losses)
    curve = [
        {"step": i, "instruct_val_loss": loss, "general": {"prose_loss": p, "qa_loss": 2 * p, "qa_greedy": g}}
        for i, (loss, p, g) in enumerate(zip(losses, prose, greedy))
    ]
    return {"curve": curve, "seed": seed, "method": "adalomo", "lr": 1e-2, "seconds": 1.0}


@pytest.mark.parametrize(
    ("answer", "keys", "right"),
    [
        ("The capital of France is Paris.", ("paris",), True),
        ("A week is approximately 7 days.", ("seven", "7"), True),
        ("There are 17 of them.", ("seven", "7"), False),  # a digit inside a number is not the number
        ("It freezes at -18.0000000", ("0", "zero"), False),
        ("Water boils at 100 degrees.", ("0", "zero"), False),
        ("Water freezes at 0 degrees.", ("0", "zero"), True),
        ("The largest mammal is the Blue Whale.", ("blue whale",), True),
        ("Blue skies and a whale.", ("blue whale",), False),
        ("It is the sunflower.", ("sun",), False),
    ],
)
def test_greedy_answer_needs_the_answer_as_whole_words(modules, answer, keys, right):
    assert modules["general_ability"].answer_is_right(answer, keys) is right


def test_every_greedy_question_is_one_of_the_probe_questions(modules):
    ga = modules["general_ability"]
    assert set(ga.ANSWER_KEYS) <= {q for q, _ in ga.QUESTIONS}
    assert len(ga.ANSWER_KEYS) >= 30


def test_forgetting_is_interpolated_where_the_target_is_first_reached(modules):
    run = made_up_run([2.0, 1.8, 1.6, 1.7], [3.0, 3.1, 3.3, 3.9])
    at = modules["harness.training"].forgetting_at(run, 1.7, ("prose_loss", "qa_loss"))
    # halfway between steps 1 and 2 (losses 1.8 and 1.6): prose halfway between 3.1 and 3.3, minus the base 3.0
    assert at["prose_loss"] == pytest.approx(0.2)
    assert at["qa_loss"] == pytest.approx(0.4)
    assert modules["harness.training"].forgetting_at(run, 1.5) is None  # never reached
    assert modules["harness.training"].forgetting_at(run, 2.5) == {"prose_loss": 0.0, "qa_loss": 0.0}  # reached before training


def test_interval_is_students_t(modules):
    ci = modules["claims_smollm2"].interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)
    assert (ci["mean"], ci["low"], ci["high"], ci["n"]) == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    assert math.isnan(modules["claims_smollm2"].interval([1.0])["low"])


def test_hft_forgetting_half_of_full_at_equal_loss_gives_ratio_one_half(modules):
    claims = modules["claims_smollm2"]
    # full fine-tuning reaches 1.5; HFT stops at 1.6, so the deepest common level is 1.6. On the way both
    # follow loss -> prose rise linearly, full at slope 1, HFT at slope 0.5: at equal loss HFT's rise is half.
    full = [made_up_run([2.0, 1.8, 1.5], [3.0, 3.2, 3.5], [0.6, 0.5, 0.2], seed=s) for s in (0, 1)]
    hft = [made_up_run([2.0, 1.8, 1.6], [3.0, 3.1, 3.2], [0.6, 0.55, 0.45], seed=s) for s in (0, 1)]
    per_seed = claims.forgetting_by_seed(full, hft)
    assert per_seed[0]["levels"][-1] == pytest.approx(1.6)
    summary = claims.forgetting_summary(per_seed)
    end = summary[str(claims.LEVELS[-1])]
    assert end["prose_loss"]["full"]["mean"] == pytest.approx(0.4)
    assert end["prose_loss"]["hft"]["mean"] == pytest.approx(0.2)
    assert end["prose_loss"]["ratio_of_means"] == pytest.approx(0.5)
    assert end["prose_loss"]["hft_minus_full"]["mean"] == pytest.approx(-0.2)
    # the greedy score falls: full from 0.6 to 0.3 at loss 1.6 (two thirds of the way from 0.5 to 0.2), HFT to 0.45
    assert end["qa_greedy"]["full"]["mean"] == pytest.approx(-0.3)
    assert end["qa_greedy"]["hft"]["mean"] == pytest.approx(-0.15)
    assert end["qa_greedy"]["ratio_of_means"] == pytest.approx(0.5)


def test_a_run_stopped_early_leaves_every_evaluation_before_it(modules):
    from harness import training as qc

    class Stub:  # a trainer whose fifth step fails, as a run killed mid-way would stop
        trainable = 1
        steps = 0

        def step(self, batch):
            self.steps += 1
            if self.steps == 5:
                raise KeyboardInterrupt
            return 0.0

    saved = []
    evals = {"instruct_val_loss": lambda: 1.0}
    with pytest.raises(KeyboardInterrupt):
        qc.train(Stub(), iter(range(100)), 8, evals, 2, initial={"instruct_val_loss": 2.0},
                 on_record=lambda curve: saved.append([p["step"] for p in curve]))
    assert saved == [[0, 2], [0, 2, 4]]  # the given initial point is not re-evaluated; every evaluation is saved


def test_unfinished_runs_are_listed_with_their_last_point(modules, tmp_path, monkeypatch):
    import json

    claims = modules["claims_smollm2"]
    monkeypatch.setattr(claims, "CACHE", tmp_path)
    done, stopped, never = (claims.job("hft", 1e-2, seed, True) for seed in (0, 1, 2))
    claims.cache_path(done).write_text("{}")
    run = made_up_run([2.0, 1.8], [3.0, 3.2], [0.6, 0.5])
    claims.partial_path(stopped).write_text(json.dumps({"curve": [dict(p, step=8 * p["step"]) for p in run["curve"]]}))
    note = claims.unfinished([done, stopped, never])
    assert "seed 0" not in note
    assert f"seed 1: stopped after step 8 of {claims.SETUP['steps']}" in note
    assert "held-out loss 1.8000" in note and "prose loss change +0.2000" in note
    assert "seed 2: not run" in note


def test_no_equal_loss_comparison_when_full_fine_tuning_never_improves(modules):
    claims = modules["claims_smollm2"]
    # full fine-tuning only gets worse on the target; HFT improves: no common level below the base loss
    full = [made_up_run([2.0, 2.3, 2.1], [3.0, 3.2, 3.1], seed=s) for s in (0, 1)]
    hft = [dict(made_up_run([2.0, 1.9, 1.8], [3.0, 3.0, 3.0], seed=s), method="hft") for s in (0, 1)]
    per_seed = claims.forgetting_by_seed(full, hft)
    assert [s["progress"] for s in per_seed] == [False, False]
    assert claims.forgetting_summary(per_seed) == {}
    report = claims.forgetting_report({"adalomo": full, "hft": hft}, per_seed, {})
    assert "Not measurable here" in report
    # at equal steps HFT ends 0.3 lower on the target (-0.2 vs +0.1) and 0.1 lower on prose
    assert "| held-out loss change | +0.1000" in report
    assert "-0.3000 [-0.3000, -0.3000]" in report


def test_adalomo_against_adamw_is_a_paired_ratio_of_final_losses(modules):
    claims = modules["claims_smollm2"]
    runs = {
        "adamw": [made_up_run([2.5, 2.0], [3.0, 3.0], seed=s) for s in (0, 1, 2)],
        "adalomo": [made_up_run([2.5, x], [3.0, 3.0], seed=s) for s, x in enumerate((2.02, 2.04, 2.06))],
        "lomo": [made_up_run([2.5, 2.2], [3.0, 3.0], seed=s) for s in (0, 1, 2)],
    }
    text, summary = claims.optimizers_report(runs, {"adamw": 1e-4, "adalomo": 3e-3, "lomo": 1e-2})
    ratio = summary["adalomo_over_adamw"]
    assert ratio["mean"] == pytest.approx(1.02)
    assert ratio["high"] - ratio["mean"] == pytest.approx(4.303 * 0.01 / math.sqrt(3))
    assert "met by the mean only" in text  # the mean is at the target, the interval reaches past it
    assert summary["lomo_over_adamw"]["mean"] == pytest.approx(1.1)
