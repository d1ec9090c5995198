"""Instruction tasks from files in the standard formats, one file per task.

- JSONL, one example per line: {"instruction": ..., "input": ..., "output": ...}
- TRACE (a JSON list): [{"prompt": ..., "answer": ...}, ...]
- Super-NaturalInstructions (a JSON object): {"Definition": [...], "Instances":
  [{"input": ..., "output": [...]}, ...]}; the first listed output is the answer.

Errors name the file and the line (or record) and say what is expected.
"""

from __future__ import annotations

import json
from pathlib import Path

from forgetless.core.schema import ConfigError
from forgetless.streams.base import Example

TEMPLATE = "{instruction}\n{input}\n"
JSONL_FIELDS = ("instruction", "input", "output")


def load_task_file(path: str | Path, template: str = TEMPLATE) -> list[Example]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"task file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        examples = _jsonl(path, text, template)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        examples = _superni(path, data, template) if isinstance(data, dict) else _trace(path, data)
    if not examples:
        raise ConfigError(f"{path}: the task has no examples")
    return examples


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


def _superni(path: Path, data: dict, template: str) -> list[Example]:
    if "Instances" not in data or "Definition" not in data:
        raise ConfigError(
            f"{path}: a Super-NaturalInstructions task needs Definition and Instances"
        )
    definition = data["Definition"]
    if not (isinstance(definition, list) and all(isinstance(d, str) for d in definition)):
        raise ConfigError(f"{path}: Definition must be a list of strings")
    definition = " ".join(definition)
    examples = []
    for i, instance in enumerate(data["Instances"]):
        outputs = instance.get("output") if isinstance(instance, dict) else None
        if (not isinstance(instance.get("input"), str) or not isinstance(outputs, list)
                or not outputs or not isinstance(outputs[0], str)):  # fmt: skip
            raise ConfigError(
                f"{path}, instance {i}: expected an object with an input string and a "
                "non-empty list of output strings"
            )
        prompt = template.format(instruction=definition, input=instance["input"])
        examples.append(Example(prompt, outputs[0]))
    return examples
