"""Instruction streams for language models: one task per experience, in the grid's order.

Built-in tasks have real content that ships offline. Fact tasks memorise pycountry's
records (country -> alpha-3 code, alpha-3 -> numeric code, ...) and are scored on the
facts they trained on; string tasks (uppercase, reverse, shift letters, ...) are scored
on held-out words drawn from pycountry's country and language names. A task may also
be a file in JSONL, TRACE or Super-NaturalInstructions format (streams.task_files), or a
pair of files (`{train: ..., test: ...}`) where the benchmark ships its own test set, as
TRACE does; such tasks also carry the scores their benchmark reports on generated answers
(`info["metrics"]`, with every acceptable answer in `info["references"]`).

HFT and LoRA assume a base model whose knowledge is worth keeping, so a stream names a
`base`: a general mixture of other tasks that the model is pre-trained on once (cached
by its configuration hash); held-out examples of that mixture measure how much general
ability survives (`general_retention`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from forgetless.core.schema import ConfigError, param, parse, positive, suggest
from forgetless.streams.base import Example, Experience, Stream, register_stream
from forgetless.streams.task_files import (
    METRICS,
    TaskFile,
    load_task_file,
    read_task_file,
    trace_task_name,
)


@cache
def _countries() -> list:
    import pycountry

    return sorted(pycountry.countries, key=lambda c: c.alpha_3)


@cache
def _currencies() -> list:
    import pycountry

    return sorted(pycountry.currencies, key=lambda c: c.alpha_3)


FACTS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "country_alpha3": lambda: [(c.name, c.alpha_3) for c in _countries()],
    "alpha3_numeric": lambda: [(c.alpha_3, c.numeric) for c in _countries()],
    "country_alpha2": lambda: [(c.name, c.alpha_2) for c in _countries()],
    "alpha2_alpha3": lambda: [(c.alpha_2, c.alpha_3) for c in _countries()],
    "currency_code": lambda: [(c.name, c.alpha_3) for c in _currencies()],
}
STRINGS: dict[str, Callable[[str], str]] = {
    "uppercase": str.upper,
    "reverse": lambda w: w[::-1],
    "shift": lambda w: "".join(chr((ord(ch) - 97 + 1) % 26 + 97) for ch in w),
    "sort": lambda w: "".join(sorted(w)),
    "capitalize": str.capitalize,
    "double": lambda w: "".join(ch + ch for ch in w),
    "drop_vowels": lambda w: re.sub("[aeiou]", "", w) or "-",
    "last_letter": lambda w: w[-1],
}
BUILTIN = sorted(FACTS) + sorted(STRINGS)
DEFAULT_TASKS = ["country_alpha3", "uppercase", "reverse", "shift", "alpha3_numeric"]
GENERAL_TASKS = ["country_alpha2", "currency_code", "sort", "capitalize", "double"]


@cache
def words() -> tuple[list[str], list[str]]:
    """Lower-case words of 3-8 letters from pycountry's names, split 70/30 once for all
    tasks and seeds, so held-out words are never trained on by any task or base model."""
    import pycountry

    names = [c.name for c in pycountry.countries] + [lang.name for lang in pycountry.languages]
    found = sorted({w for n in names for w in re.findall(r"[a-z]+", n.lower()) if 3 <= len(w) <= 8})
    order = np.random.default_rng(0).permutation(len(found))
    cut = int(0.7 * len(found))
    return [found[i] for i in order[:cut]], [found[i] for i in order[cut:]]


def prompt(task: str, text: str) -> str:
    return f"{task}: {text}\n"


def task_examples(task: str, train_size: int, test_size: int, seed: int):
    """(train, test) examples of a built-in task or a task file."""
    split = task_split(task, train_size, test_size, seed)
    return split.train, split.test


def _builtin_examples(task: str, train_size: int, test_size: int, seed: int):
    rng = np.random.default_rng(seed)
    if task in FACTS:
        facts = FACTS[task]()
        order = rng.permutation(len(facts))[:train_size]
        known = [Example(prompt(task, facts[i][0]), facts[i][1]) for i in order]
        # More examples than facts: every fact again, in a fresh order each pass, so a
        # memorisation task takes as many steps as a string task of the same train_size.
        passes = [known] + [[known[i] for i in rng.permutation(len(known))]
                            for _ in range(-(-train_size // len(known)) - 1)]  # fmt: skip
        train = [e for p in passes for e in p][:train_size]
        return train, known[:test_size]  # memorisation: scored on its own facts
    train_words, test_words = words()
    rule = STRINGS[task]
    train = [Example(prompt(task, w), rule(w)) for w in rng.choice(train_words, train_size)]
    held = rng.choice(test_words, min(test_size, len(test_words)), replace=False)
    return train, [Example(prompt(task, w), rule(w)) for w in held]


@dataclass
class TaskFiles:
    """A task whose benchmark ships its test set as a file of its own (TRACE's test.json)."""

    train: str = param(help="the training examples: a .json / .jsonl task file")
    test: str = param(help="the test examples: a task file of the same format")
    name: str | None = param(
        None, "the experience's name (default: TRACE's task folder, else the file's name)"
    )
    metrics: list[str] | None = param(
        None,
        f"scores on generated answers, of {', '.join(METRICS)} (default: the format's own: "
        "SuperNI rougeL and exact_match_norm, TRACE by task; [] for none)",
    )

    def validate(self, where: str) -> None:
        for i, metric in enumerate(self.metrics or []):
            if metric not in METRICS:
                raise ConfigError(
                    f"{where}.metrics[{i}]: unknown score {metric!r}{suggest(metric, METRICS)}; "
                    f"one of {', '.join(METRICS)}"
                )
        train, test = read_task_file(self.train), read_task_file(self.test)
        if train.format != test.format:
            raise ConfigError(
                f"{where}.test: {self.test} is a {test.format} file but {where}.train is "
                f"{train.format}; give the test set of the same benchmark"
            )


@dataclass
class TaskSplit:
    """One task's experience: its name, examples, and what generated answers are scored by."""

    name: str
    train: list[Example]
    test: list[Example]
    references: list[list[str]] = field(default_factory=list)  # per test example
    metrics: tuple[str, ...] = ()


def task_split(task: str | dict, train_size: int, test_size: int, seed: int) -> TaskSplit:
    """The train and test examples of a task: built-in, a task file (a fifth of it held out,
    at most test_size), or a pair of files (the first test_size records of its test file,
    in the file's order, for every seed)."""
    if isinstance(task, dict):
        files = parse(TaskFiles, task, "task")
        train, test = read_task_file(files.train), read_task_file(files.test)
        order = np.random.default_rng(seed).permutation(len(train.examples))[:train_size]
        metrics = test.metrics if files.metrics is None else tuple(files.metrics)
        return TaskSplit(
            files.name or _file_task_name(files.train, train),
            [train.examples[i] for i in order],
            test.examples[:test_size],
            test.references[:test_size],
            metrics,
        )  # fmt: skip
    if task in FACTS or task in STRINGS:
        train, test = _builtin_examples(task, train_size, test_size, seed)
        return TaskSplit(task, train, test, [[e.answer] for e in test])
    loaded = read_task_file(task)
    order = np.random.default_rng(seed).permutation(len(loaded.examples))
    n_test = min(test_size, len(loaded.examples) // 5) or 1
    held = order[:n_test]
    name = task.rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix(".json")
    return TaskSplit(
        name,
        [loaded.examples[i] for i in order[n_test:][:train_size]],
        [loaded.examples[i] for i in held],
        [loaded.references[i] for i in held],
        loaded.metrics,
    )


def _file_task_name(path: str, task: TaskFile) -> str:
    if task.format == "trace":
        return trace_task_name(path)
    return Path(path).name.removesuffix(".jsonl").removesuffix(".json")


def _check_task(task: Any, where: str) -> None:
    if isinstance(task, dict):
        parse(TaskFiles, task, where)  # reads both files: names any problem, before any run
        return
    if not isinstance(task, str):
        raise ConfigError(
            f"{where}: expected a task name, a task file or {{train: file, test: file}}, "
            f"got {task!r}"
        )
    if task in BUILTIN:
        return
    if task.endswith((".json", ".jsonl")):
        load_task_file(task)  # names the file and line of any problem, before any run
        return
    raise ConfigError(
        f"{where}: unknown task {task!r}{suggest(task, BUILTIN)}; built-in tasks: "
        f"{', '.join(BUILTIN)}; or a path to a .jsonl / .json task file"
    )


@dataclass
class BaseConfig:
    """The general mixture a base model is pre-trained on once, then cached."""

    tasks: list[str] = param(GENERAL_TASKS, "tasks of the mixture (none may be in the stream)")
    train_size: int = param(300, "examples per mixture task")
    epochs: int = param(6, "passes over the mixture")
    lr: float = param(1e-3, "AdamW learning rate")
    batch_size: int = param(16, "examples per step")
    warmup_steps: int = param(0, "steps of linear learning-rate warm-up")
    learn_prompts: bool = param(
        True, "take the loss on prompts too, so the base can write a task's inputs (SSR)"
    )
    general_size: int = param(
        200,
        "held-out examples per task that measure general ability (a fact task has at most "
        "its facts); a few hundred in all leave a retention near 0.05 to sampling noise",
    )


@dataclass
class InstructionsConfig:
    tasks: list[Any] = param(
        DEFAULT_TASKS,
        "in stream order: built-in task names, task files (.jsonl, TRACE or SuperNI .json), "
        "or {train: file, test: file, name: ..., metrics: [...]} for a benchmark's own test set",
    )
    train_size: int = param(
        200, "training examples per task (a fact task repeats its facts to fill it)"
    )
    test_size: int = param(100, "test examples per task (fact tasks: of the trained facts)")
    base: BaseConfig | None = param(BaseConfig(), "pre-train a base model first (null: none)")

    def validate(self, where: str) -> None:
        positive(self.train_size, f"{where}.train_size")
        positive(self.test_size, f"{where}.test_size")
        if not self.tasks:
            raise ConfigError(f"{where}.tasks: list at least one task")
        for i, task in enumerate(self.tasks):
            _check_task(task, f"{where}.tasks[{i}]")
        keys = [json.dumps(t, sort_keys=True) for t in self.tasks]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{where}.tasks: {self.tasks} repeats a task")
        if self.base is not None:
            for i, task in enumerate(self.base.tasks):
                _check_task(task, f"{where}.base.tasks[{i}]")
            shared = sorted(set(self.base.tasks) & {t for t in self.tasks if isinstance(t, str)})
            if shared:
                raise ConfigError(
                    f"{where}.base.tasks: {shared} are also in the stream; the base mixture "
                    "must hold other tasks, or general retention measures nothing"
                )


@dataclass
class BaseMixture:
    """What the runner needs to pre-train (or load) the base model."""

    config: BaseConfig
    train: list[Example] = field(default_factory=list)


@register_stream("instructions", kind="generation")
def instructions(config: InstructionsConfig, seed: int) -> Stream:
    """Instruction tuning, task after task, from a pre-trained base."""
    experiences = []
    for i, task in enumerate(config.tasks):
        split = task_split(task, config.train_size, config.test_size, seed)
        info: dict[str, Any] = {"task": split.name}
        if split.metrics:
            info.update(metrics=list(split.metrics), references=split.references)
        experiences.append(
            Experience(i, split.name, split.train, split.test, kind="generation", info=info)
        )
    base = general = None
    if config.base is not None:
        # The base (and its held-out set) does not depend on the cell seed: one base per config.
        mixture = [task_examples(t, config.base.train_size, config.base.general_size, 0)
                   for t in config.base.tasks]  # fmt: skip
        base = BaseMixture(config.base, [e for train, _ in mixture for e in train])
        general = [e for _, test in mixture for e in test]
    return Stream("instructions", "instruction", experiences, general=general, base=base)
