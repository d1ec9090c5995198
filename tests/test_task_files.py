"""Task files (JSONL, TRACE, Super-NaturalInstructions) read into instruction examples, with
errors that name the file and the line; the real format samples load; an `instructions`
stream of task files is validated with the grid, before any run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from shared_data import SHARED_DATA, needs_shared_data

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import build_params, grid_from_dict
from forgetless.streams import Example, build_stream
from forgetless.streams.instructions import InstructionsConfig
from forgetless.streams.task_files import TEMPLATE, load_task_file


def jsonl(path: Path, records: list) -> Path:
    """Write `records` one per line; a str record is written verbatim (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(i: int) -> dict[str, str]:
    return {"instruction": "Add one.", "input": str(i), "output": str(i + 1)}


# --- JSONL ----------------------------------------------------------------------------------


def test_jsonl_lines_become_examples_with_the_prompt_template(tmp_path):
    path = jsonl(
        tmp_path / "task.jsonl",
        [
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Négation", "input": "oui ✓", "output": "non", "extra": 1},
        ],
    )
    examples = load_task_file(path)
    assert examples == [
        Example("Translate to French.\ncat\n", "chat"),
        Example("Négation\noui ✓\n", "non"),
    ]
    assert examples[0].prompt == TEMPLATE.format(instruction="Translate to French.", input="cat")


def test_jsonl_custom_template_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n" + json.dumps(record(1)) + "\n   \n" + json.dumps(record(2)) + "\n")
    examples = load_task_file(path, template="Q: {instruction} {input} A:")
    assert examples == [Example("Q: Add one. 1 A:", "2"), Example("Q: Add one. 2 A:", "3")]


def test_jsonl_malformed_line_names_the_file_and_the_line_number(tmp_path):
    path = jsonl(tmp_path / "broken.jsonl", [record(0), record(1), '{"instruction": "x", '])
    with pytest.raises(ConfigError, match="malformed JSON") as error:
        load_task_file(path)
    assert str(path) in str(error.value)
    assert "line 3" in str(error.value)


def test_jsonl_blank_lines_count_in_the_reported_line_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(record(0)) + "\n\n\nnot json\n")
    with pytest.raises(ConfigError, match=r"line 4\b"):
        load_task_file(path)


def test_jsonl_missing_field_names_the_line_and_the_field(tmp_path):
    missing_output = {"instruction": "Add one.", "input": "1"}
    path = jsonl(tmp_path / "task.jsonl", [record(0), missing_output])
    with pytest.raises(ConfigError) as error:
        load_task_file(path)
    message = str(error.value)
    assert str(path) in message and "line 2" in message
    assert "'output'" in message and "'input'" not in message.split(";")[0]


def test_jsonl_non_string_field_is_refused_like_a_missing_one(tmp_path):
    path = jsonl(tmp_path / "task.jsonl", [{"instruction": "Add one.", "input": 1, "output": "2"}])
    with pytest.raises(
        ConfigError, match=re.escape("line 1: missing or non-string field(s) ['input']")
    ):
        load_task_file(path)


def test_jsonl_line_that_is_not_an_object_names_the_line(tmp_path):
    path = jsonl(tmp_path / "task.jsonl", [record(0), '["instruction", "input", "output"]'])
    with pytest.raises(ConfigError, match="line 2"):
        load_task_file(path)


def test_empty_jsonl_file_has_no_examples(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="no examples") as error:
        load_task_file(path)
    assert str(path) in str(error.value)


def test_missing_task_file_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "task.jsonl"
    with pytest.raises(ConfigError, match="does not exist") as error:
        load_task_file(path)
    assert str(path) in str(error.value)


# --- TRACE and Super-NaturalInstructions written by the test -----------------------------------


def test_trace_list_of_prompt_answer_records_loads(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"prompt": "2+2=", "answer": "4"}, {"prompt": "p", "answer": "a"}]))
    assert load_task_file(path) == [Example("2+2=", "4"), Example("p", "a")]


def test_trace_bad_record_names_its_index(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"prompt": "2+2=", "answer": "4"}, {"prompt": "x", "answer": 5}]))
    with pytest.raises(ConfigError, match="record 1") as error:
        load_task_file(path)
    assert str(path) in str(error.value)


def test_malformed_json_task_file_names_the_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": \n]\n')
    with pytest.raises(ConfigError, match="malformed JSON at line 4") as error:
        load_task_file(path)
    assert str(path) in str(error.value)


def test_superni_without_definition_is_refused(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"Instances": [{"input": "x", "output": ["y"]}]}))
    with pytest.raises(ConfigError, match="Definition and Instances"):
        load_task_file(path)


def test_superni_instance_with_empty_output_names_the_instance(tmp_path):
    path = tmp_path / "s.json"
    instances = [{"input": "a", "output": ["b"]}, {"input": "c", "output": []}]
    path.write_text(json.dumps({"Definition": ["Do it."], "Instances": instances}))
    with pytest.raises(ConfigError, match="instance 1"):
        load_task_file(path)


def test_superni_definition_written_as_a_string_is_not_spelled_out(tmp_path):
    path = tmp_path / "s.json"
    instances = [{"input": "a", "output": ["b"]}]
    path.write_text(json.dumps({"Definition": "Say it.", "Instances": instances}))
    try:
        examples = load_task_file(path)
    except ConfigError:
        return  # refusing it is fine too
    assert examples[0].prompt.startswith("Say it.\n")


def test_superni_non_string_output_names_the_instance(tmp_path):
    path = tmp_path / "s.json"
    instances = [{"input": "a", "output": ["b"]}, {"input": "c", "output": [5]}]
    path.write_text(json.dumps({"Definition": ["Do it."], "Instances": instances}))
    with pytest.raises(ConfigError, match="instance 1"):
        load_task_file(path)


# --- the real samples ---------------------------------------------------------------------


@needs_shared_data
def test_real_trace_fomc_sample_loads_as_prompt_answer_examples():
    path = SHARED_DATA / "trace" / "FOMC.train.sample.json"
    examples = load_task_file(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert len(examples) == 80
    assert all(isinstance(e.prompt, str) and isinstance(e.answer, str) for e in examples)
    assert examples[0] == Example(raw[0]["prompt"], raw[0]["answer"])
    assert examples[0].prompt.startswith("What is the monetary policy stance")
    assert {e.answer for e in examples} <= {"dovish", "hawkish", "neutral"}


@needs_shared_data
def test_real_superni_sample_joins_the_definition_into_the_prompt():
    path = SHARED_DATA / "superni" / "task363_sst2_polarity_classification.sample.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    examples = load_task_file(path)
    assert len(examples) == 24
    definition = " ".join(raw["Definition"])
    for example, instance in zip(examples, raw["Instances"]):
        assert example.prompt == f"{definition}\n{instance['input']}\n"
        assert example.answer == instance["output"][0]
    assert {e.answer for e in examples} <= {"POS", "NEG"}


# --- instructions streams of task files, through the grid ------------------------------------


def instruction_grid(tasks: list[str], **stream) -> dict:
    return {
        "name": "files",
        "seeds": [0],
        "streams": [
            {
                "name": "instructions",
                "tasks": tasks,
                "base": None,
                "train_size": 50,
                "test_size": 4,
                **stream,
            }
        ],
        "model": {"name": "llama_tiny", "layers": 1, "hidden": 32, "heads": 2},
        "strategies": ["naive"],
    }


def test_instructions_stream_of_task_files_builds_with_held_out_test_sets(tmp_path):
    first = jsonl(tmp_path / "add.jsonl", [record(i) for i in range(30)])
    second = tmp_path / "echo.json"
    second.write_text(json.dumps([{"prompt": f"echo {i}", "answer": str(i)} for i in range(12)]))
    grid = grid_from_dict(instruction_grid([str(first), str(second)]))
    (cell,) = grid.cells
    config = build_params(InstructionsConfig, cell.config["stream"], "stream")
    stream = build_stream("instructions", config, cell.seed)

    assert stream.kind == "generation" and stream.scenario == "instruction"
    assert [e.name for e in stream] == ["add", "echo"]
    assert stream.base is None and stream.general is None
    for experience, total, n_test in (
        (stream.experiences[0], 30, 4),
        (stream.experiences[1], 12, 2),
    ):
        # at most test_size, at most a fifth of the file, never trained on
        assert len(experience.test) == n_test
        assert len(experience.train) == total - n_test
        assert not set(experience.test) & set(experience.train)
    assert set(stream.experiences[0].train) | set(stream.experiences[0].test) == set(
        load_task_file(first)
    )
    # the seed fixes the split
    again = build_stream("instructions", config, cell.seed)
    assert [e.test for e in again] == [e.test for e in stream]


def test_task_file_train_size_caps_the_training_examples(tmp_path):
    path = jsonl(tmp_path / "add.jsonl", [record(i) for i in range(40)])
    grid = grid_from_dict(instruction_grid([str(path)], train_size=10))
    config = build_params(InstructionsConfig, grid.cells[0].config["stream"], "stream")
    (experience,) = build_stream("instructions", config, 0)
    assert len(experience.train) == 10 and len(experience.test) == 4


def test_unknown_builtin_task_name_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=re.escape('(did you mean "uppercase"?)')) as error:
        grid_from_dict(instruction_grid(["uppercas", "reverse"]))
    assert "streams[0].tasks[0]" in str(error.value)
    assert "task file" in str(error.value)


def test_base_mixture_task_also_in_the_stream_is_refused():
    grid = instruction_grid(["uppercase", "sort"], base={"tasks": ["sort", "double"]})
    with pytest.raises(ConfigError, match="also in the stream") as error:
        grid_from_dict(grid)
    assert "['sort']" in str(error.value)
    assert "streams[0].base.tasks" in str(error.value)


def test_bad_task_file_fails_grid_validation_before_any_run(tmp_path):
    good = jsonl(tmp_path / "good.jsonl", [record(i) for i in range(10)])
    bad = jsonl(tmp_path / "bad.jsonl", [record(0), record(1), {"instruction": "x", "input": "y"}])
    with pytest.raises(ConfigError) as error:
        grid_from_dict(instruction_grid([str(good), str(bad)]))
    message = str(error.value)
    assert str(bad) in message and "line 3" in message and "'output'" in message


def test_missing_task_file_fails_grid_validation(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        grid_from_dict(instruction_grid([str(tmp_path / "absent.jsonl")]))


def test_bad_task_file_in_the_base_mixture_fails_grid_validation(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="Definition and Instances"):
        grid_from_dict(instruction_grid(["uppercase"], base={"tasks": [str(bad)]}))
