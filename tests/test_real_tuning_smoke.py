"""benchmarks/real_tuning.py --smoke: the real-model tuning benchmark's code path (full FT,
HFT and LoRA through the runner on the SuperNI and TRACE samples of ../shared/data) on a
tiny random Llama, as a user runs it, ending in its one JSON line; and the final metrics
the benchmark reads: a cell on SuperNI and TRACE tasks logs each benchmark's score to
MLflow as `final/<score>`, per task and averaged. The figures of a smoke run measure
nothing: only their shape and range are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rouge_score import rouge_scorer
from shared_data import needs_shared_data

from forgetless.experiments import evaluate
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import run_grid

ROOT = Path(__file__).resolve().parents[1]
SST2 = "task363_sst2_polarity_classification.sample"
SCORES = {SST2: {"exact_match", "rougeL", "exact_match_norm"}, "FOMC": {"exact_match", "accuracy"}}


@pytest.mark.integration  # a fresh Python that imports torch and MLflow and runs three grids
@needs_shared_data
def test_real_tuning_smoke_prints_each_method_s_scores_after_each_task(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FORGETLESS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "benchmarks/real_tuning.py", "--smoke"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"methods", "model", "steps_per_task", "smoke"} and result["smoke"]
    assert set(result["methods"]) == {"naive", "hft", "lora"}
    for method, figures in result["methods"].items():
        assert set(figures) == {"tasks", "final", "train_seconds", "seconds", "cpu_seconds"}, method
        assert set(figures["tasks"]) == set(SCORES)
        for task, scores in figures["tasks"].items():
            assert set(scores) == SCORES[task], (method, task)
            for after in scores.values():
                assert set(after) == {"after_task_1", "after_task_2"}
                assert all(0 <= v <= 1 for v in after.values()), (method, task, after)
        # each task's benchmark score at the end is the cell's final metric (one task each)
        final = {SST2: ("rougeL", "exact_match_norm"), "FOMC": ("accuracy",)}
        for task, names in final.items():
            for name in names:
                assert figures["final"][name] == figures["tasks"][task][name]["after_task_2"]
        assert 0 < figures["train_seconds"] <= figures["seconds"] and figures["cpu_seconds"] > 0


def test_superni_and_trace_cells_log_their_benchmark_scores_as_final_metrics(
    tmp_path, monkeypatch, tracking_uri, offline, one_thread
):
    superni = tmp_path / "task1.json"
    instances = [{"input": f"review {i}", "output": ["POS", "positive"]} for i in range(10)]
    superni.write_text(json.dumps({"Definition": ["Classify."], "Instances": instances}))
    meetingbank = tmp_path / "MeetingBank"  # a TRACE generation task: scored by ROUGE-L
    meetingbank.mkdir()
    for split in ("train", "test"):
        records = [{"prompt": f"Sum {i}: ", "answer": ["the cat sat", "POS"][i % 2]}
                   for i in range(4)]  # fmt: skip
        (meetingbank / f"{split}.json").write_text(json.dumps(records))
    # The model's greedy answers, for both test sets (2 examples each): known answers, known scores.
    answers = ["positive review", "POS"]
    monkeypatch.setattr(evaluate, "generated_answers", lambda strategy, data: answers)
    tasks = [str(superni), {"train": str(meetingbank / "train.json"),
                            "test": str(meetingbank / "test.json")}]  # fmt: skip
    grid = grid_from_dict({
        "name": "final-benchmark-scores", "seeds": [0],
        "streams": [{"name": "instructions", "tasks": tasks, "base": None, "train_size": 8,
                     "test_size": 2}],
        "model": {"name": "llama_tiny", "layers": 1, "hidden": 32, "heads": 2, "context": 64},
        "train": {"batch_size": 8, "lr": 1e-3, "optimizer": "adamw"},
        "strategies": ["naive"], "storage": str(tmp_path / "runs"),
    })  # fmt: skip
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    logged = MlflowClient(tracking_uri).get_run(outcome.run_id).data.metrics

    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # "positive review" against "positive": LCS 1, P = 1/2, R = 1, F = 2/3; against "POS"
    # (stemmed "po" vs "posit") 0; the best of the two references counts.
    assert rouge.score("positive", "positive review")["rougeL"].fmeasure == pytest.approx(2 / 3)
    superni_rouge = (2 / 3 + 1.0) / 2  # then "POS" against "POS": 1
    meetingbank_rouge = (0.0 + 1.0) / 2  # "positive review" vs "the cat sat", "POS" vs "POS"
    assert logged["final/rougeL/exp_0"] == pytest.approx(superni_rouge)
    assert logged["final/rougeL/exp_1"] == pytest.approx(meetingbank_rouge)
    assert logged["final/rougeL"] == pytest.approx((superni_rouge + meetingbank_rouge) / 2)
    # normalised exact match: "positive review" matches no reference, "POS" does
    assert logged["final/exact_match_norm/exp_0"] == pytest.approx(0.5)
    assert logged["final/exact_match_norm"] == pytest.approx(0.5)
    assert "final/exact_match_norm/exp_1" not in logged  # MeetingBank is not scored by it
    assert "final/avg_acc" in logged  # beside the matrix's exact match, not instead of it
