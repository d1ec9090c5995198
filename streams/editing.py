"""Edit streams: a sequence of fact corrections, for lifelong model editing (issue #8).

`pycountry_edits` turns real facts shipped in pycountry (a country's alpha-3, alpha-2
and numeric ISO codes) into counterfactual edit requests. Each fact is stated with
eight prompt templates; one of them, drawn once per fact and the same for every seed,
is held out of the base model's corpus and becomes the edit's paraphrase, so that
generalization measures what an edit does to a phrasing the model never saw for that
fact. The new target of an edit is the true answer of another country for the same
relation. Locality prompts are facts of countries that no edit touches; the runner
caches the base model's own answers to them before the first edit.

`load_zsre` and `load_counterfact` read the JSON files EasyEdit publishes (ZsRE's
MEND split; CounterFact in EasyEdit's flat form and ROME's nested form); the `zsre` and
`counterfact` streams apply T of their records and score them as EasyEdit does (see
`_file_stream` and `LocalityPair`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from forgetless.core.schema import ConfigError, param, positive, suggest
from forgetless.streams.base import Example, Experience, Stream, register_stream
from forgetless.streams.instructions import BaseMixture

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """Make the model answer `prompt` with `target` (it knew `original`)."""

    subject: str
    relation: str
    prompt: str
    target: str
    original: str
    paraphrases: tuple[str, ...] = ()
    loc_prompts: tuple[str, ...] = ()
    """Unrelated prompts with their answers, each one text, that an editor may train
    against (WISE's irrelevant x_i, EasyEdit's `loc_prompt`); never one of the scored
    locality prompts."""

    @property
    def answer(self) -> str:
        """The answer the edit teaches (so a request reads like an `Example`)."""
        return self.target


RELATIONS = {
    "alpha3": (
        lambda c: c.alpha_3,
        [
            "The alpha-3 code of {} is ",
            "{} has the alpha-3 code ",
            "ISO alpha-3 for {}: ",
            "Q: alpha-3 code of {}? A: ",
            "{}'s three-letter code is ",
            "Three-letter ISO code of {}: ",
            "In three letters, {} is written ",
            "alpha3({}) = ",
        ],
    ),
    "alpha2": (
        lambda c: c.alpha_2,
        [
            "The alpha-2 code of {} is ",
            "{} has the alpha-2 code ",
            "ISO alpha-2 for {}: ",
            "Q: alpha-2 code of {}? A: ",
            "{}'s two-letter code is ",
            "Two-letter ISO code of {}: ",
            "In two letters, {} is written ",
            "alpha2({}) = ",
        ],
    ),
    "numeric": (
        lambda c: c.numeric,
        [
            "The numeric code of {} is ",
            "{} has the numeric code ",
            "ISO numeric for {}: ",
            "Q: numeric code of {}? A: ",
            "{}'s three-digit code is ",
            "Three-digit ISO code of {}: ",
            "In digits, {} is written ",
            "numeric({}) = ",
        ],
    ),
}


@cache
def countries(max_name: int = 14) -> list[tuple[str, object]]:
    """(name, record) of pycountry's countries with a short plain name, in alpha-3 order."""
    import pycountry

    found = sorted(pycountry.countries, key=lambda c: c.alpha_3)
    return [(c.name, c) for c in found if len(c.name) <= max_name and not set(c.name) & set(",()")]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str
    held_out: int  # index of the template held out of the base corpus (the paraphrase)

    def prompt(self, template: int) -> str:
        return RELATIONS[self.relation][1][template].format(self.subject)


def facts(relations: list[str], n_subjects: int) -> list[Fact]:
    """Every (subject, relation) fact, with its held-out template drawn once for all seeds."""
    rng = np.random.default_rng(0)
    chosen = countries()[:n_subjects]
    n_templates = len(RELATIONS["alpha3"][1])
    return [
        Fact(name, rel, RELATIONS[rel][0](record), int(rng.integers(n_templates)))
        for rel in relations
        for name, record in chosen
    ]


@dataclass
class FactBaseConfig:
    """How the base model learns the fact corpus once (cached by this config and the model's)."""

    epochs: int = param(40, "passes over the fact corpus")
    lr: float = param(1e-3, "AdamW learning rate")
    batch_size: int = param(32, "examples per step")
    warmup_steps: int = param(100, "steps of linear learning-rate warm-up")
    decay: Literal["constant", "cosine"] = param(
        "cosine", "learning rate after the warm-up: constant, or a cosine to 0 at the last step"
    )
    # Filled from the stream so that the cache key covers the corpus too.
    relations: list[str] = param([], "(set by the stream) relations of the corpus")
    subjects: int = param(0, "(set by the stream) subjects of the corpus")


@dataclass
class PycountryEditsConfig:
    relations: list[str] = param(["alpha3", "numeric"], "relations of the facts")
    subjects: int = param(80, "countries whose facts the base model learns")
    edits: int = param(10, "T: edits in total, applied in sequence")
    edits_per_experience: int = param(1, "edits in one experience (one edit batch)")
    locality: int = param(20, "subjects whose facts (all relations) must not change")
    reserve: int = param(
        10, "subjects whose facts are the editors' unrelated training prompts (loc_prompts)"
    )
    loc_prompts: int = param(8, "unrelated training prompts given with each edit, drawn anew")
    forget_after: int = param(
        0,
        "k > 0: the edits of every other experience (t = 0, 2, ...) are forgotten at experience "
        "t + k (Larimar); 0: nothing is forgotten",
    )
    base: FactBaseConfig = param(FactBaseConfig(), "pre-training of the base model")

    def validate(self, where: str) -> None:
        for name in ("subjects", "edits", "edits_per_experience", "locality", "reserve",
                     "loc_prompts"):  # fmt: skip
            positive(getattr(self, name), f"{where}.{name}")
        if not self.relations:
            raise ConfigError(f"{where}.relations: list at least one of {sorted(RELATIONS)}")
        for i, rel in enumerate(self.relations):
            if rel not in RELATIONS:
                raise ConfigError(
                    f"{where}.relations[{i}]: unknown relation {rel!r}"
                    f"{suggest(rel, RELATIONS)}; known: {', '.join(sorted(RELATIONS))}"
                )
        available = len(countries())
        if self.subjects > available:
            raise ConfigError(f"{where}.subjects: {self.subjects} > the {available} countries")
        if self.edits % self.edits_per_experience:
            raise ConfigError(
                f"{where}.edits: {self.edits} is not a multiple of edits_per_experience="
                f"{self.edits_per_experience}; every experience must hold the same number"
            )
        spare = self.reserve * len(self.relations) * len(RELATIONS["alpha3"][1])
        if self.loc_prompts > spare:
            raise ConfigError(
                f"{where}.loc_prompts: {self.loc_prompts} > the {spare} prompts of the reserve "
                "facts (reserve x relations x templates); lower it or raise reserve"
            )
        check_forget_after(self.forget_after, self.edits // self.edits_per_experience, where)
        editable = (self.subjects - self.locality - self.reserve) * len(self.relations)
        if self.edits > editable:
            raise ConfigError(
                f"{where}: {self.edits} edits need as many facts of the subjects outside the "
                f"locality and reserve sets ({self.subjects} - {self.locality} - "
                f"{self.reserve} subjects: {max(editable, 0)} facts); raise subjects or lower "
                "edits / locality / reserve"
            )


def check_forget_after(k: int, experiences: int, where: str) -> None:
    if not 0 <= k < experiences:
        raise ConfigError(
            f"{where}.forget_after: {k} is not in [0, {experiences - 1}]: edits are forgotten "
            f"k experiences after they are made, within the stream's {experiences}"
        )


@dataclass
class EditCorpus:
    """The base model's corpus (every fact under every template but its held-out one)."""

    config: FactBaseConfig
    train: list[Example] = field(default_factory=list)
    paraphrases: list[Example] = field(default_factory=list)  # held-out, true answers


def edit_stream(
    name: str,
    requests: list[EditRequest],
    per_experience: int,
    locality: list[Example],
    base: BaseMixture | None = None,
    forget_after: int = 0,
) -> Stream:
    """Experiences of `per_experience` requests each; `general` holds the locality prompts
    (answers replaced by the model's own before the first edit, see experiments.editing).

    With `forget_after` k > 0, experience t + k also asks to forget the edits of experience
    t for every even t (`info["forget"]`), and experience t says when (`info["forgotten_at"]`):
    half the edits are forgotten, half kept, so both forget success and the survival of the
    kept edits are measured."""
    for i, r in enumerate(requests):
        check_request(r, f"{name}: edit {i}")
    locality = drop_overlap(locality, requests, name)
    n = len(requests) // per_experience
    batches = [requests[k * per_experience : (k + 1) * per_experience] for k in range(n)]
    experiences = []
    for k, batch in enumerate(batches):
        info: dict = {"edits": per_experience}
        if forget_after and k % 2 == 0 and k + forget_after < n:
            info["forgotten_at"] = k + forget_after
        if forget_after and k >= forget_after and (k - forget_after) % 2 == 0:
            info["forget"] = batches[k - forget_after]  # the requests, for the editor
            info["forgets_experience"] = k - forget_after  # for the manifest
        name_k = f"edits_{k * per_experience}-{(k + 1) * per_experience - 1}"
        experiences.append(Experience(k, name_k, batch, batch, kind="edit", info=info))
    return Stream(name, "editing", experiences, general=locality, base=base)


def check_request(r: EditRequest, where: str) -> None:
    for name in ("prompt", "target"):
        if not str(getattr(r, name)).strip():
            raise ConfigError(f"{where} ({r.subject!r}): empty {name}; every edit needs one")


def drop_overlap(locality: list[Example], requests: list[EditRequest], where: str) -> list[Example]:
    """Locality prompts that mention an edited subject or equal an edit prompt are dropped."""
    prompts = {p for r in requests for p in (r.prompt, *r.paraphrases)}
    subjects = {r.subject for r in requests if r.subject}
    kept = [e for e in locality
            if e.prompt not in prompts and not any(s in e.prompt for s in subjects)]  # fmt: skip
    if len(kept) < len(locality):
        log.warning(
            "%s: dropped %d locality prompts that overlap the edits",
            where,
            len(locality) - len(kept),
        )
    if not kept:
        raise ConfigError(f"{where}: every locality prompt overlaps an edit; none left to score")
    return kept


@register_stream("pycountry_edits", kind="edit")
def pycountry_edits(config: PycountryEditsConfig, seed: int) -> Stream:
    """Counterfactual edits of pycountry facts, from a base model that learned them all."""
    corpus = facts(config.relations, config.subjects)
    base_config = replace(config.base, relations=list(config.relations), subjects=config.subjects)
    n_templates = len(RELATIONS["alpha3"][1])
    train = [Example(f.prompt(t), f.answer) for f in corpus
             for t in range(n_templates) if t != f.held_out]  # fmt: skip
    paraphrases = [Example(f.prompt(f.held_out), f.answer) for f in corpus]
    base = EditCorpus(base_config, train, paraphrases)

    # Locality subjects first, then T edited facts among the other subjects' facts (a
    # subject may be edited in several relations); the draw is the cell seed's.
    rng = np.random.default_rng(seed)
    subjects = sorted({f.subject for f in corpus})
    order = rng.permutation(len(subjects))
    unrelated = {subjects[i] for i in order[: config.locality]}
    reserved = {subjects[i] for i in order[config.locality :][: config.reserve]}
    editable = [f for f in corpus if f.subject not in unrelated | reserved]
    spare = [f for f in corpus if f.subject in reserved]
    requests = []
    for k in rng.permutation(len(editable))[: config.edits]:
        fact = editable[k]
        others = sorted({f.answer for f in corpus if f.relation == fact.relation} - {fact.answer})
        target = others[rng.integers(len(others))]
        trained = [t for t in range(n_templates) if t != fact.held_out]
        template = trained[rng.integers(len(trained))]
        drawn = rng.choice(len(spare) * n_templates, size=config.loc_prompts, replace=False)
        requests.append(
            EditRequest(
                fact.subject,
                fact.relation,
                fact.prompt(template),
                target,
                fact.answer,
                (fact.prompt(fact.held_out),),
                tuple(
                    spare[k // n_templates].prompt(k % n_templates) + spare[k // n_templates].answer
                    for k in drawn
                ),
            )
        )
    locality = []
    for f in corpus:
        if f.subject in unrelated:
            trained = [t for t in range(n_templates) if t != f.held_out]
            locality.append(Example(f.prompt(trained[rng.integers(len(trained))]), f.answer))
    return edit_stream(
        "pycountry_edits", requests, config.edits_per_experience, locality, base,
        config.forget_after,
    )  # fmt: skip


# --- EasyEdit's JSON formats -----------------------------------------------------------


def _records(path: str | Path) -> list[dict]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a JSON list of edit records ({e})") from e
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _field(record: dict, name: str, where: str):
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected an object, got {type(record).__name__}")
    value = record.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{where}: missing field {name!r}; the record has {sorted(record)}")
    return value


def _zsre_records(path: str | Path) -> list[tuple[EditRequest, list[Example]]]:
    """Each ZsRE record as a request and its locality pair (`loc`, `loc_ans`)."""
    records = []
    for i, r in enumerate(_records(path)):
        where = f"{path}: record {i}"
        answers = r.get("answers") if isinstance(r, dict) else None
        original = answers[0] if answers else _field(r, "pred", where)
        request = EditRequest(
            _field(r, "subject", where), "zsre", _field(r, "src", where),
            _field(r, "alt", where), original, (_field(r, "rephrase", where),),
        )  # fmt: skip
        records.append((request, [Example(_field(r, "loc", where), _field(r, "loc_ans", where))]))
    return records


def load_zsre(path: str | Path) -> tuple[list[EditRequest], list[Example]]:
    """ZsRE as EasyEdit and WISE load it (`zsre_mend_*.json`): requests, and the NQ
    locality pairs (`loc`, `loc_ans`) of the same records."""
    return _flat(_zsre_records(path))


def _counterfact_records(path: str | Path) -> list[tuple[EditRequest, list[Example]]]:
    """Each CounterFact record as a request and its locality prompts with their true
    answers (the flat form's one `locality_prompt`, the nested form's neighborhood prompts)."""
    records = []
    for i, r in enumerate(_records(path)):
        where = f"{path}: record {i}"
        if isinstance(r, dict) and "requested_rewrite" in r:
            rw = _field(r, "requested_rewrite", where)
            subject = _field(rw, "subject", f"{where}.requested_rewrite")
            target = _field(_field(rw, "target_new", where), "str", f"{where}.target_new")
            true = _field(_field(rw, "target_true", where), "str", f"{where}.target_true")
            prompt = _field(rw, "prompt", f"{where}.requested_rewrite").format(subject)
            paraphrases = tuple(_field(r, "paraphrase_prompts", where))
            request = EditRequest(subject, rw.get("relation_id", ""), prompt, target, true,
                                  paraphrases)  # fmt: skip
            records.append((request, [Example(p, true) for p in r.get("neighborhood_prompts", [])]))
            continue
        request = EditRequest(
            _field(r, "subject", where), "counterfact", _field(r, "prompt", where),
            _field(r, "target_new", where), _field(r, "ground_truth", where),
            (_field(r, "rephrase_prompt", where),),
        )  # fmt: skip
        loc_answer = _field(r, "locality_ground_truth", where)
        records.append((request, [Example(_field(r, "locality_prompt", where), loc_answer)]))
    return records


def load_counterfact(path: str | Path) -> tuple[list[EditRequest], list[Example]]:
    """CounterFact in EasyEdit's flat form (`prompt, target_new, ground_truth, subject,
    rephrase_prompt, locality_prompt, locality_ground_truth`) or ROME's nested form
    (`requested_rewrite{prompt with {}, subject, target_new{str}, target_true{str}},
    paraphrase_prompts[], neighborhood_prompts[]`)."""
    return _flat(_counterfact_records(path))


def _flat(records: list[tuple[EditRequest, list[Example]]]):
    return [r for r, _ in records], [e for _, loc in records for e in loc]


@dataclass(frozen=True)
class LocalityPair(Example):
    """A locality prompt with its dataset answer (ZsRE's `loc`/`loc_ans`, CounterFact's
    neighborhood prompts and true answer), scored as EasyEdit scores locality: the answer is
    teacher-forced and each of its tokens must keep the model's pre-edit prediction
    (experiments.editing caches those predictions before the first edit)."""


@dataclass
class EditFileConfig:
    path: str = param("", "the JSON file, as EasyEdit publishes it")
    edits: int = param(10, "T: the records applied in sequence, from `start` on")
    start: int = param(0, "index of the first record applied (a T=1 run per record: a grid axis)")
    edits_per_experience: int = param(1, "edits in one experience")
    loc_prompts: int = param(
        1,
        "unrelated training prompts given with each edit (WISE's x_i): other records' "
        "locality prompt and answer, never a scored one, drawn by the seed; 0: none",
    )
    forget_after: int = param(
        0,
        "k > 0: the edits of every other experience (t = 0, 2, ...) are forgotten at experience "
        "t + k (Larimar); 0: nothing is forgotten",
    )

    def validate(self, where: str) -> None:
        positive(self.edits, f"{where}.edits")
        positive(self.edits_per_experience, f"{where}.edits_per_experience")
        for name in ("start", "loc_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if not Path(self.path).is_file():
            raise ConfigError(f"{where}.path: no file {self.path!r}")
        if self.edits % self.edits_per_experience:
            raise ConfigError(f"{where}.edits: not a multiple of edits_per_experience")
        check_forget_after(self.forget_after, self.edits // self.edits_per_experience, where)
        held = len(_records(self.path))
        if self.start + self.edits > held:
            raise ConfigError(
                f"{where}.edits: records {self.start} to {self.start + self.edits - 1} are asked "
                f"for (start + edits) and {self.path} holds {held}; lower start or edits"
            )


def _file_stream(name: str, records, config: EditFileConfig, seed: int) -> Stream:
    """Records start .. start + T - 1 as edits, scored as EasyEdit scores them: the target
    after the prompt and a space (EasyEdit tokenizes prompt + ' ' + target), generalization
    on the records' paraphrases, locality on their own locality pairs. Each edit gets
    `loc_prompts` unrelated training prompts from the other records' locality pairs."""
    stop = config.start + config.edits  # within the file: EditFileConfig.validate
    applied = records[config.start : stop]
    locality = [LocalityPair(e.prompt, " " + e.answer.strip()) for _, loc in applied for e in loc]
    scored = {e.prompt for e in locality}
    spare = [f"{e.prompt} {e.answer.strip()}" for _, loc in records[: config.start] + records[stop:]
             for e in loc if e.prompt not in scored]  # fmt: skip
    if config.loc_prompts > len(spare):
        raise ConfigError(
            f"stream.loc_prompts: {config.loc_prompts} unrelated prompts per edit, but "
            f"{config.path} has {len(spare)} locality pairs outside the edited records; lower it"
        )
    rng = np.random.default_rng(seed)
    requests = [
        replace(
            r, target=" " + r.target.strip(),
            loc_prompts=tuple(spare[k] for k in rng.choice(len(spare), config.loc_prompts,
                                                           replace=False)),
        )
        for r, _ in applied
    ]  # fmt: skip
    return edit_stream(
        name, requests, config.edits_per_experience, locality, forget_after=config.forget_after
    )


@register_stream("zsre", kind="edit")
def zsre(config: EditFileConfig, seed: int) -> Stream:
    """ZsRE edits from an EasyEdit JSON file (no base corpus: use a pretrained model)."""
    return _file_stream("zsre", _zsre_records(config.path), config, seed)


@register_stream("counterfact", kind="edit")
def counterfact(config: EditFileConfig, seed: int) -> Stream:
    """CounterFact edits from an EasyEdit or ROME JSON file (use a pretrained model)."""
    return _file_stream("counterfact", _counterfact_records(config.path), config, seed)
