"""Instruction streams for language models: one task per experience, in the grid's order.

Built-in tasks have real content that ships offline. Fact tasks memorise pycountry's
records (country -> alpha-3 code, alpha-3 -> numeric code, ...) and are scored on the
facts they trained on; string tasks (uppercase, reverse, shift letters, ...) are scored
on held-out words drawn from pycountry's country and language names. A task may also
be a file in JSONL, TRACE or Super-NaturalInstructions format (streams.task_files).

HFT and LoRA assume a base model whose knowledge is worth keeping, so a stream names a
`base`: a general mixture of other tasks that the model is pre-trained on once (cached
by its configuration hash); held-out examples of that mixture measure how much general
ability survives (`general_retention`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from forgetless.core.schema import ConfigError, param, positive, suggest
from forgetless.streams.base import Example, Experience, Stream, register_stream
from forgetless.streams.task_files import load_task_file


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
    if task in STRINGS:
        train_words, test_words = words()
        rule = STRINGS[task]
        train = [Example(prompt(task, w), rule(w)) for w in rng.choice(train_words, train_size)]
        held = rng.choice(test_words, min(test_size, len(test_words)), replace=False)
        return train, [Example(prompt(task, w), rule(w)) for w in held]
    examples = load_task_file(task)
    order = rng.permutation(len(examples))
    n_test = min(test_size, len(examples) // 5) or 1
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:][:train_size]]
    return train, test


def _check_task(task: str, where: str) -> None:
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
    tasks: list[str] = param(DEFAULT_TASKS, "task names or task files, in stream order")
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
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"{where}.tasks: {self.tasks} repeats a task")
        if self.base is not None:
            for i, task in enumerate(self.base.tasks):
                _check_task(task, f"{where}.base.tasks[{i}]")
            shared = sorted(set(self.base.tasks) & set(self.tasks))
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
        train, test = task_examples(task, config.train_size, config.test_size, seed)
        name = task.rsplit("/", 1)[-1].removesuffix(".jsonl").removesuffix(".json")
        experiences.append(Experience(i, name, train, test, kind="generation", info={"task": name}))
    base = general = None
    if config.base is not None:
        # The base (and its held-out set) does not depend on the cell seed: one base per config.
        mixture = [task_examples(t, config.base.train_size, config.base.general_size, 0)
                   for t in config.base.tasks]  # fmt: skip
        base = BaseMixture(config.base, [e for train, _ in mixture for e in train])
        general = [e for _, test in mixture for e in test]
    return Stream("instructions", "instruction", experiences, general=general, base=base)
