"""Larimar: the memory's write, read and forget; refusals; the checkpoint; the scope check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forgetless.experiments import checkpoint
from forgetless.experiments.schema import ConfigError
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.strategies import TrainConfig
from forgetless.strategies.larimar import (
    CapacityError,
    EpisodicMemory,
    Larimar,
    LarimarConfig,
    NotInMemory,
    episode_read,
)
from forgetless.streams import Example, Stream
from forgetless.streams.editing import EditCorpus, EditRequest, FactBaseConfig, edit_stream

TINY = LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64, context=64)
FAST = {"slots": 16, "code": 32, "episode": 8, "decoded": 4, "steps": 20}
COUNTRIES = ["Chile", "Peru", "Japan", "Kenya", "Norway", "Egypt", "Canada", "Spain"]
CODES = ["CHL", "PER", "JPN", "KEN", "NOR", "EGY", "CAN", "ESP"]


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latents(n: int, code: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, code, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the memory -----------------------------------------------------------------------------


def test_write_then_read_of_one_latent_returns_it():
    memory = EpisodicMemory(slots=8, code=32, prior_precision=1e-6)
    z = latents(1)
    memory.write(z)
    assert torch.allclose(memory.read(z), z, atol=1e-8)


def test_forgetting_one_of_k_leaves_the_others_readable_and_the_forgotten_one_not():
    memory = EpisodicMemory(slots=8, code=32, prior_precision=1e-4)
    z = latents(5)
    for row in z:  # sequential writes, one fact each (Eqs. 3-4)
        memory.write(row[None])
    memory.forget(z[2:3])
    kept = torch.cat([z[:2], z[3:]])
    assert torch.allclose(memory.read(kept), kept, atol=1e-8)
    forgotten = memory.read(z[2:3])
    assert (forgotten - z[2:3]).norm() > 0.5 * z[2].norm()  # only its shadow on the others
    # Forgetting undoes the write: the memory is the one that never saw the fact.
    never = EpisodicMemory(slots=8, code=32, prior_precision=1e-4)
    for row in kept:
        never.write(row[None])
    assert torch.allclose(memory.M, never.M, atol=1e-9)
    assert torch.allclose(memory.C, never.C, atol=1e-9)
    assert memory.count == 4


def test_the_training_read_is_the_memory_write_then_read():
    z, queries = latents(6, seed=1), latents(3, seed=2)
    memory = EpisodicMemory(slots=8, code=32, prior_precision=1e-4)
    memory.write(z)
    assert torch.allclose(episode_read(z, queries, ridge=1e-12), memory.read(queries), atol=1e-8)


def test_a_memory_too_small_says_its_capacity_and_changes_nothing():
    memory = EpisodicMemory(slots=4, code=32, prior_precision=1e-6)
    memory.write(latents(3))
    before = memory.M.clone()
    with pytest.raises(CapacityError, match="holds 4 facts; 3 are written and 2 more"):
        memory.write(latents(2, seed=5))
    assert torch.equal(memory.M, before) and memory.count == 3


def test_config_refuses_more_slots_than_the_latent_can_separate():
    with pytest.raises(ConfigError, match="keep slots <= code"):
        LarimarConfig(slots=64, code=32).validate("strategy")


# --- the strategy ---------------------------------------------------------------------------


def request(i: int, target: int) -> EditRequest:
    prompt = f"The alpha-3 code of {COUNTRIES[i]} is "
    paraphrase = f"{COUNTRIES[i]}'s three-letter code is "
    return EditRequest(COUNTRIES[i], "alpha3", prompt, CODES[target], CODES[i], (paraphrase,))


@pytest.fixture(scope="module")
def parts():
    """A tiny stream with a base fact corpus and a tiny untrained Llama."""
    corpus = [Example(f"The alpha-3 code of {c} is ", a) for c, a in zip(COUNTRIES, CODES)]
    corpus += [Example(f"{c}'s three-letter code is ", a) for c, a in zip(COUNTRIES, CODES)]
    base = EditCorpus(FactBaseConfig(), corpus, [])
    requests = [request(0, 1), request(2, 3), request(4, 5)]
    locality = [Example("Q: numeric code of Mongolia? A: ", "496")]
    stream = edit_stream("tiny_edits", requests, 1, locality, base)
    torch.manual_seed(0)
    weights = llama_tiny(TINY, None).state_dict()
    return stream, weights


def make(parts, **params) -> Larimar:
    stream, weights = parts
    model = llama_tiny(TINY, None)
    model.load_state_dict(weights)
    config = LarimarConfig(**{**FAST, **params})
    return Larimar(model, config, TrainConfig(), stream)


def logits_of(strategy: Larimar, prompts: list[str]) -> torch.Tensor:
    examples = [Example(p, "XYZ") for p in prompts]
    return strategy.logits(strategy.model.encode(examples, 48))


@pytest.mark.parametrize("train_decoder,prefix", [(False, 0), (True, 2)])
def test_scope_check_gives_unrelated_queries_exactly_the_pre_edit_logits(
    parts, train_decoder, prefix
):
    larimar = make(parts, train_decoder=train_decoder, prefix=prefix)
    weights = {k: v.clone() for k, v in larimar.model.state_dict().items()}
    unrelated = ["Stock prices fell sharply today. ", "Q: numeric code of Mongolia? A: "]
    edited = ["The alpha-3 code of Chile is "]
    before = logits_of(larimar, unrelated + edited)
    larimar.train(parts[0].experiences[0])  # Chile -> PER
    after = logits_of(larimar, unrelated + edited)
    assert torch.equal(after[:2], before[:2])
    assert not torch.allclose(after[2], before[2])  # the edit's own prompt reads the memory
    for name, value in larimar.model.state_dict().items():  # an edit is no gradient step
        assert torch.equal(value, weights[name]), name


def test_forgetting_an_edit_returns_its_prompt_to_the_pre_edit_logits(parts):
    larimar = make(parts, scope_threshold=0.02)  # Chile's prompt is not in Japan's scope
    prompts = ["The alpha-3 code of Chile is ", "The alpha-3 code of Japan is "]
    before = logits_of(larimar, prompts)
    larimar.train(parts[0].experiences[0])
    larimar.train(parts[0].experiences[1])
    larimar.forget([request(0, 1)])
    after = logits_of(larimar, prompts)
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])  # the other edit still reads the memory
    assert larimar.memory.count == 1


def test_forgetting_a_fact_never_written_is_refused_and_memory_is_untouched(parts):
    larimar = make(parts)
    larimar.train(parts[0].experiences[0])
    before = larimar.memory.M.clone()
    with pytest.raises(NotInMemory, match="never written"):
        larimar.forget([request(0, 1), request(2, 3)])  # the first was written, not the second
    assert torch.equal(larimar.memory.M, before) and larimar.scope.facts == [
        "The alpha-3 code of Chile is PER"
    ]


def test_state_round_trips_through_a_checkpoint(parts, tmp_path: Path):
    larimar = make(parts)
    larimar.train(parts[0].experiences[0])
    larimar.train(parts[0].experiences[1])
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save(path, {"strategy": larimar.state_dict()})
    restored = make(parts)
    restored.load_state_dict(checkpoint.load(path)["strategy"])  # weights_only=True
    prompts = ["The alpha-3 code of Chile is ", "Kenya's three-letter code is "]
    assert torch.equal(logits_of(restored, prompts), logits_of(larimar, prompts))
    assert torch.equal(restored.memory.M, larimar.memory.M)
    restored.forget([request(2, 3)])  # the restored memory still knows what it holds
    assert restored.memory.count == 1


def test_a_stream_without_a_base_corpus_is_refused(parts):
    stream, weights = parts
    bare = Stream("bare", "editing", stream.experiences)
    model = llama_tiny(TINY, None)
    with pytest.raises(ConfigError, match="base fact corpus"):
        Larimar(model, LarimarConfig(**FAST), TrainConfig(), bare)


def test_an_encoder_that_does_not_load_is_a_clear_error(parts, tmp_path: Path):
    with pytest.raises(ConfigError, match="not a saved sentence encoder"):
        make(parts, encoder=str(tmp_path))
