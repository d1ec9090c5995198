"""Instruction tasks from files in the standard formats, one file per task.

- JSONL, one example per line: {"instruction": ..., "input": ..., "output": ...}
- TRACE (a JSON list): [{"prompt": ..., "answer": ...}, ...]
- Super-NaturalInstructions (a JSON object): {"Definition": [...], "Instances":
  [{"input": ..., "output": [...]}, ...]}; the first listed output is the answer, and every
  listed output is a reference its scores take the best of.

Each format brings the scores its benchmark reports on generated answers (`metrics`,
computed by experiments.instruction_metrics): SuperNI's ROUGE-L and normalised exact match
(allenai/natural-instructions, eval/automatic/evaluation.py); TRACE's accuracy on its
classification tasks and ROUGE-L on its generation tasks (BeyonderXX/TRACE, evaluations/),
by the task's name. Errors name the file and the line (or record) and say what is expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from forgetless.core.schema import ConfigError
from forgetless.streams.base import Example

TEMPLATE = "{instruction}\n{input}\n"
JSONL_FIELDS = ("instruction", "input", "output")
SUPERNI_METRICS = ("rougeL", "exact_match_norm")
# TRACE's evaluations/eval_<task>.py: accuracy (the generated answer equals the answer) on
# the classification tasks, ROUGE-L on the generation tasks; ScienceQA both, accuracy on
# its first character (the option) and ROUGE-L on the reasoning after it. BLEU, SARI
# (20Minuten) and Py150's edit similarity are not computed: ROUGE-L stands in for Py150.
TRACE_METRICS = {
    "c-stance": ("accuracy",),
    "fomc": ("accuracy",),
    "numglue-cm": ("accuracy",),
    "numglue-ds": ("accuracy",),
    "scienceqa": ("option_accuracy", "reasoning_rougeL"),
    "meetingbank": ("rougeL",),
    "20minuten": ("rougeL",),
    "py150": ("rougeL",),
}
TRACE_DEFAULT = ("accuracy", "rougeL")  # a TRACE-format task of another name
METRICS = ("rougeL", "exact_match_norm", "accuracy", "option_accuracy", "reasoning_rougeL")


@dataclass
class TaskFile:
    """A task file read: its examples, every acceptable answer of each, and its scores."""

    format: str  # jsonl | trace | superni
    examples: list[Example]
    references: list[list[str]]
    metrics: tuple[str, ...]


def load_task_file(path: str | Path, template: str = TEMPLATE) -> list[Example]:
    return read_task_file(path, template).examples


def read_task_file(path: str | Path, template: str = TEMPLATE) -> TaskFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        examples = _jsonl(path, text, template)
        task = TaskFile("jsonl", examples, [[e.answer] for e in examples], ())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        if isinstance(data, dict):
            examples, references = _superni(path, data, template)
            task = TaskFile("superni", examples, references, SUPERNI_METRICS)
        else:
            examples = _trace(path, data)
            metrics = TRACE_METRICS.get(trace_task_name(path).lower(), TRACE_DEFAULT)
            task = TaskFile("trace", examples, [[e.answer] for e in examples], metrics)
    if not task.examples:
        raise ConfigError(f"{path}: the task has no examples")
    return task


def trace_task_name(path: str | Path) -> str:
    """TRACE's task of a file: its folder as TRACE ships it (LLM-CL_Benchmark/FOMC/test.json),
    else the file name up to its first dot (FOMC.test.sample.json)."""
    path = Path(path)
    if path.stem in ("train", "test", "eval"):
        return path.parent.name
    return path.name.split(".", 1)[0]


def _jsonl(path: Path, text: str, template: str) -> list[Example]:
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}, line {number}: malformed JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise ConfigError(f"{path}, line {number}: expected a JSON object, got {line[:40]!r}")
        missing = [f for f in JSONL_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise ConfigError(
                f"{path}, line {number}: missing or non-string field(s) {missing}; each line "
                'needs {"instruction": str, "input": str, "output": str}'
            )
        prompt = template.format(instruction=record["instruction"], input=record["input"])
        examples.append(Example(prompt, record["output"]))
    return examples


def _trace(path: Path, data) -> list[Example]:
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of {{prompt, answer}} records (TRACE)")
    examples = []
    for i, record in enumerate(data):
        if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
                and isinstance(record.get("answer"), str)):  # fmt: skip
            raise ConfigError(f'{path}, record {i}: expected {{"prompt": str, "answer": str}}')
        examples.append(Example(record["prompt"], record["answer"]))
    return examples


def _superni(path: Path, data: dict, template: str) -> tuple[list[Example], list[list[str]]]:
    if "Instances" not in data or "Definition" not in data:
        raise ConfigError(
            f"{path}: a Super-NaturalInstructions task needs Definition and Instances"
        )
    definition = data["Definition"]
    if not (isinstance(definition, list) and all(isinstance(d, str) for d in definition)):
        raise ConfigError(f"{path}: Definition must be a list of strings")
    definition = " ".join(definition)
    examples, references = [], []
    for i, instance in enumerate(data["Instances"]):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        if (not isinstance(outputs, list) or not isinstance(instance.get("input"), str)
                or not outputs or not all(isinstance(o, str) for o in outputs)):  # fmt: skip
            raise ConfigError(
                f"{path}, instance {i}: expected an object with an input string and a "
                "non-empty list of output strings"
            )
        prompt = template.format(instruction=definition, input=instance["input"])
        examples.append(Example(prompt, outputs[0]))
        references.append(list(outputs))
    return examples, references
