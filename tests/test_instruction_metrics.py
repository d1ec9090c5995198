"""SuperNI's and TRACE's scores of generated answers: ROUGE-L and the exact matches checked
by hand on short strings, each format's metrics and references read from the real samples
and from files the tests write, TRACE's own test file, and greedy answers scored per
experience as `<score>/exp_<j>` extras."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from shared_data import SHARED_DATA, needs_shared_data

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import build_params, grid_from_dict
from forgetless.experiments.evaluate import generated_answers, score_stream
from forgetless.experiments.instruction_metrics import (
    SCORES,
    normalize_answer,
    rouge_l,
    score_answers,
)
from forgetless.experiments.runner import build_cell
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.strategies import TrainConfig
from forgetless.strategies.naive import Naive
from forgetless.streams import Example, Experience, Stream, build_stream
from forgetless.streams.instructions import InstructionsConfig, task_split
from forgetless.streams.task_files import METRICS, TRACE_METRICS, read_task_file

FOMC_TRAIN = SHARED_DATA / "trace" / "FOMC.train.sample.json"
FOMC_TEST = SHARED_DATA / "trace" / "FOMC.test.sample.json"
SST2 = SHARED_DATA / "superni" / "task363_sst2_polarity_classification.sample.json"


pytestmark = pytest.mark.usefixtures("offline", "one_thread")


# --- the scores, by hand ------------------------------------------------------------------


def test_rouge_l_of_two_short_strings_by_hand():
    # LCS of [the cat sat on the mat] and [the cat lay on the mat] is 5 tokens of 6 each:
    # P = R = 5/6, F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # [the cat] inside [the black cat sat]: LCS 2, P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3.
    assert rouge_l("the cat", "the black cat sat") == pytest.approx(2 / 3)


def test_rouge_l_lowercases_drops_punctuation_and_stems_as_superni_does():
    assert rouge_l("Cats, running!", "cat runs") == pytest.approx(1.0)
    assert rouge_l("", "cat") == 0.0


def test_superni_normalisation_and_exact_match_take_the_best_reference():
    assert normalize_answer("  The Cat,  sat!\n") == "the cat sat"
    scores = score_answers(["exact_match_norm"], ["pos.", "neg"], [["NEG", "POS"], ["POS"]])
    assert scores == {"exact_match_norm": 0.5}


def test_rouge_l_over_several_references_takes_the_best_then_the_mean():
    scores = score_answers(
        ["rougeL"], ["the cat", "a dog"], [["the black cat sat", "the cat"], ["dog"]]
    )
    # 1.0 (second reference) and [a dog] vs [dog]: P = 1/2, R = 1, F = 2/3.
    assert scores["rougeL"] == pytest.approx((1.0 + 2 / 3) / 2)


def test_trace_accuracy_is_string_equality_and_an_empty_answer_is_wrong():
    scores = score_answers(
        ["accuracy"], ["dovish", "dovish ", "", "Hawkish"], [["dovish"]] * 3 + [["hawkish"]]
    )
    assert scores == {"accuracy": 0.25}


def test_scienceqa_scores_the_option_by_accuracy_and_the_reasoning_by_rouge():
    prediction, reference = "A\nthe cat sat", "A\nthe cat lay"
    scores = score_answers(["option_accuracy", "reasoning_rougeL"], [prediction], [[reference]])
    assert scores["option_accuracy"] == 1.0
    assert scores["reasoning_rougeL"] == pytest.approx(2 / 3)  # LCS 2 of 3 and 3


def test_every_declared_metric_has_a_scorer():
    assert set(METRICS) == set(SCORES)
    assert {m for metrics in TRACE_METRICS.values() for m in metrics} <= set(METRICS)


# --- formats bring their metrics and references ---------------------------------------------


def trace_file(path: Path, n: int, start: int = 0) -> Path:
    records = [{"prompt": f"Stance of {i}? ", "answer": ["dovish", "hawkish"][i % 2]}
               for i in range(start, start + n)]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def superni_file(path: Path, n: int) -> Path:
    instances = [{"id": f"t-{i}", "input": f"review {i}", "output": ["POS", "positive"]}
                 for i in range(n)]  # fmt: skip
    path.write_text(json.dumps({"Definition": ["Classify."], "Instances": instances}))
    return path


def test_superni_file_keeps_every_output_as_a_reference(tmp_path):
    task = read_task_file(superni_file(tmp_path / "task1.json", 3))
    assert task.format == "superni"
    assert task.metrics == ("rougeL", "exact_match_norm")
    assert task.references == [["POS", "positive"]] * 3
    assert [e.answer for e in task.examples] == ["POS"] * 3


def test_trace_task_metrics_follow_the_task_folder_or_file_name(tmp_path):
    fomc = trace_file(tmp_path / "LLM-CL_Benchmark" / "FOMC" / "test.json", 2)
    meeting = trace_file(tmp_path / "MeetingBank.test.json", 2)
    other = trace_file(tmp_path / "mine.json", 2)
    assert read_task_file(fomc).metrics == ("accuracy",)
    assert read_task_file(meeting).metrics == ("rougeL",)
    assert read_task_file(other).metrics == ("accuracy", "rougeL")
    assert read_task_file(fomc).references == [["dovish"], ["hawkish"]]


def test_jsonl_task_files_carry_no_generation_metrics(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"instruction": "Add one.", "input": "1", "output": "2"}) + "\n")
    assert read_task_file(path).metrics == ()


@needs_shared_data
def test_real_samples_bring_their_benchmarks_metrics():
    assert read_task_file(FOMC_TRAIN).metrics == ("accuracy",)
    sst2 = read_task_file(SST2)
    raw = json.loads(SST2.read_text(encoding="utf-8"))
    assert sst2.metrics == ("rougeL", "exact_match_norm")
    assert sst2.references == [i["output"] for i in raw["Instances"]]


@needs_shared_data
def test_trace_own_test_file_is_the_test_set_in_file_order_for_every_seed():
    task = {"train": str(FOMC_TRAIN), "test": str(FOMC_TEST)}
    raw = json.loads(FOMC_TEST.read_text(encoding="utf-8"))
    for seed in (0, 1):
        split = task_split(task, train_size=30, test_size=5, seed=seed)
        assert split.name == "FOMC"
        assert split.test == [Example(r["prompt"], r["answer"]) for r in raw[:5]]
        assert split.references == [[r["answer"]] for r in raw[:5]]
        assert split.metrics == ("accuracy",)
        assert len(split.train) == 30
        assert not set(split.train) & set(split.test)
    assert task_split(task, 30, 5, 0).train != task_split(task, 30, 5, 1).train


def test_task_pair_metrics_and_name_can_be_set(tmp_path):
    train = trace_file(tmp_path / "a" / "train.json", 6)
    test = trace_file(tmp_path / "a" / "test.json", 3, start=6)
    split = task_split({"train": str(train), "test": str(test), "name": "mine",
                        "metrics": ["rougeL"]}, 10, 10, 0)  # fmt: skip
    assert (split.name, split.metrics, len(split.test)) == ("mine", ("rougeL",), 3)
    assert task_split({"train": str(train), "test": str(test)}, 10, 10, 0).name == "a"


def instruction_grid(tasks: list, **stream) -> dict:
    return {
        "name": "metrics",
        "streams": [
            {
                "name": "instructions",
                "tasks": tasks,
                "base": None,
                "train_size": 8,
                "test_size": 3,
                **stream,
            }
        ],  # fmt: skip
        "model": {"name": "llama_tiny", "layers": 1, "hidden": 32, "heads": 2, "context": 640},
        "strategies": ["naive"],
    }


def test_task_pair_of_two_formats_is_refused_at_validation(tmp_path):
    train = trace_file(tmp_path / "train.json", 4)
    test = superni_file(tmp_path / "test.json", 4)
    with pytest.raises(ConfigError, match=r"streams\[0\]\.tasks\[0\]\.test: .* superni file"):
        grid_from_dict(instruction_grid([{"train": str(train), "test": str(test)}]))


def test_unknown_metric_is_refused_with_a_suggestion(tmp_path):
    train = trace_file(tmp_path / "train.json", 4)
    task = {"train": str(train), "test": str(train), "metrics": ["rougel"]}
    with pytest.raises(ConfigError, match=r'metrics\[0\]: unknown score .*did you mean "rougeL"'):
        grid_from_dict(instruction_grid([task]))


def test_task_pair_with_a_missing_test_file_is_refused(tmp_path):
    train = trace_file(tmp_path / "train.json", 4)
    task = {"train": str(train), "test": str(tmp_path / "absent.json")}
    with pytest.raises(ConfigError, match="does not exist"):
        grid_from_dict(instruction_grid([task]))


# --- greedy answers, scored per experience ---------------------------------------------------


def tiny_lm():
    torch.manual_seed(0)
    return llama_tiny(LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64), None)


def test_generated_answers_are_the_models_greedy_decoding_of_each_prompt():
    model = tiny_lm()
    examples = [Example("copy: ab\n", "ab"), Example("copy: longer words\n", "longer words")]
    samples = model.encode(examples)
    experience = Experience(0, "copy", samples, samples, kind="generation")
    strategy = Naive(
        model, None, TrainConfig(eval_batch_size=2), Stream("s", "instruction", [experience])
    )
    answers = generated_answers(strategy, samples)
    # CausalLM.generate tokenises the text prompts; the same tokens, so the same answers,
    # each cut at the batch's longest answer and its EOS (13 tokens).
    expected = [a[: len(a)] for a in model.generate([e.prompt for e in examples], 13)]
    assert answers == expected


@needs_shared_data
def test_trace_and_superni_cells_log_their_scores_per_experience():
    grid = instruction_grid(
        [{"train": str(FOMC_TRAIN), "test": str(FOMC_TEST)}, str(SST2)], test_size=3
    )
    (cell,) = grid_from_dict(grid).cells
    stream, strategy = build_cell(cell, "cpu")
    assert [e.name for e in stream] == ["FOMC", "task363_sst2_polarity_classification.sample"]
    assert stream.experiences[0].info["metrics"] == ["accuracy"]
    row, extra = score_stream(strategy, stream)
    assert len(row) == 2
    for key in ("accuracy/exp_0", "rougeL/exp_1", "exact_match_norm/exp_1"):
        assert 0.0 <= extra[key] <= 1.0
    assert "rougeL/exp_0" not in extra
    # the extras are the scores of the greedy answers against the references
    answers = generated_answers(strategy, stream.experiences[1].test)
    refs = stream.experiences[1].info["references"]
    assert extra["rougeL/exp_1"] == pytest.approx(
        score_answers(["rougeL"], answers, refs)["rougeL"]
    )


def test_instructions_stream_of_builtin_tasks_generates_nothing_extra():
    config = build_params(
        InstructionsConfig,
        {"tasks": ["uppercase", "reverse"], "base": None, "train_size": 4, "test_size": 2},
        "stream",
    )
    stream = build_stream("instructions", config, 0)
    assert all("metrics" not in e.info for e in stream)
    assert dataclasses.is_dataclass(config)
