"""Larimar: the memory's write, read and forget; refusals; the checkpoint; the scope check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgetless.core.schema import ConfigError
from forgetless.experiments import checkpoint
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.strategies import TrainConfig
from forgetless.strategies.larimar import (
    CapacityError,
    EpisodicMemory,
    Larimar,
    LarimarConfig,
    MemoryDecoder,
    NotInMemory,
    answer_starts,
    episode_read,
)
from forgetless.streams import Example, Stream
from forgetless.streams.editing import EditCorpus, EditRequest, FactBaseConfig, edit_stream

TINY = LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64, context=64)
FAST = {"slots": 16, "steps": 20, "batch_size": 8}
COUNTRIES = ["Chile", "Peru", "Japan", "Kenya", "Norway", "Egypt", "Canada", "Spain"]
CODES = ["CHL", "PER", "JPN", "KEN", "NOR", "EGY", "CAN", "ESP"]


pytestmark = pytest.mark.usefixtures("offline", "shared_cache", "one_thread")


def latents(n: int, code: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, code, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the memory -----------------------------------------------------------------------------


KEY = 16  # the first KEY columns of a latent address the memory


def test_write_then_read_of_one_latent_returns_it_from_its_key():
    memory = EpisodicMemory(slots=8, code=32, key=KEY, prior_precision=1e-6)
    z = latents(1)
    memory.write(z)
    assert torch.allclose(memory.read(z[:, :KEY]), z, atol=1e-8)


def test_each_written_key_reads_back_its_own_value_and_an_unrelated_key_reads_nothing():
    memory = EpisodicMemory(slots=8, code=32, key=KEY, prior_precision=1e-6)
    z = latents(6)
    memory.write(z[:3])  # a batch, then one at a time
    for row in z[3:]:
        memory.write(row[None])
    assert torch.allclose(memory.read(z[:, :KEY]), z, atol=1e-6)
    # A key orthogonal to every written key has no address: a zero read-out.
    q = latents(1, code=KEY, seed=9)
    basis = torch.linalg.qr(z[:, :KEY].T).Q  # KEY x 6
    q = q - (q @ basis) @ basis.T
    assert memory.read(q).abs().max() < 1e-8


def test_forgetting_one_of_k_leaves_the_others_readable_and_the_forgotten_one_not():
    memory = EpisodicMemory(slots=8, code=32, key=KEY, prior_precision=1e-4)
    z = latents(5)
    for row in z:  # sequential writes, one fact each (Eqs. 3-4)
        memory.write(row[None])
    memory.forget(z[2:3])
    kept = torch.cat([z[:2], z[3:]])
    assert torch.allclose(memory.read(kept[:, :KEY]), kept, atol=1e-6)
    forgotten = memory.read(z[2:3, :KEY])
    assert (forgotten - z[2:3]).norm() > 0.5 * z[2].norm()  # only its shadow on the others
    # Forgetting undoes the write: the memory is the one that never saw the fact.
    never = EpisodicMemory(slots=8, code=32, key=KEY, prior_precision=1e-4)
    for row in kept:
        never.write(row[None])
    assert torch.allclose(memory.M, never.M, atol=1e-9)
    assert torch.allclose(memory.C, never.C, atol=1e-9)
    assert memory.count == 4


def test_the_decoders_training_read_is_the_memorys_read():
    z, asked = latents(6, seed=1), latents(3, code=KEY, seed=2)
    memory = EpisodicMemory(slots=8, code=32, key=KEY, prior_precision=1e-9)
    memory.write(z)
    trained = episode_read(asked, z[:, :KEY], z)  # keys and values as the decoder trains
    assert torch.allclose(trained, memory.read(asked), atol=1e-6)


def test_a_memory_too_small_says_its_capacity_and_changes_nothing():
    memory = EpisodicMemory(slots=4, code=32, key=KEY, prior_precision=1e-6)
    memory.write(latents(3))
    before = memory.M.clone()
    with pytest.raises(CapacityError, match="holds 4 facts; 3 are written and 2 more"):
        memory.write(latents(2, seed=5))
    assert torch.equal(memory.M, before) and memory.count == 3


def test_more_slots_than_the_keys_can_tell_apart_are_refused():
    with pytest.raises(ConfigError, match="keep slots <= 16"):
        EpisodicMemory(slots=32, code=48, key=KEY, prior_precision=1e-4)


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


def test_the_value_is_added_where_each_answer_token_is_predicted(parts):
    torch.manual_seed(0)
    model = llama_tiny(TINY, None)
    decoder = MemoryDecoder(model, answer_tokens=3)
    batch = model.encode([Example("ab ", "XY"), Example("abcdef ", "Z")])
    values = torch.randn(2, 3 * TINY.hidden)
    out = decoder(batch.x, values, answer_starts(batch))
    embeddings = decoder.decoder.get_input_embeddings()
    for i, start in enumerate([3, 7]):  # the answer begins after the prompt's 3 or 7 bytes
        by_hand = embeddings(batch.x[i]).clone()
        width = len(by_hand)
        for k in range(3):  # the position start - 1 + k predicts the k-th answer token
            if start - 1 + k < width:
                by_hand[start - 1 + k] += decoder.w_m(values[i].view(3, -1)[k])
        expected = decoder.decoder(inputs_embeds=by_hand[None]).logits[0]
        assert torch.allclose(out[i], expected, atol=1e-5)


def test_scope_check_gives_unrelated_queries_exactly_the_pre_edit_logits(parts):
    larimar = make(parts)
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


def exact_match(strategy: Larimar, examples: list[Example]) -> list[bool]:
    batch = strategy.model.encode(examples)
    predicted, labels = strategy.logits(batch)[:, :-1].argmax(-1), batch.y[:, 1:]
    return ((predicted == labels) | (labels == -100)).all(1).tolist()


def test_written_edits_are_answered_by_their_prompts_and_paraphrases_without_a_gradient_step(
    parts,
):
    """150 steps teach the tiny decoder copy to write what the memory holds (about 4 s)."""
    larimar = make(parts, steps=150, batch_size=16, lr=0.01)
    requests = [r for e in parts[0] for r in e.train]  # Chile -> PER, Japan -> KEN, ...
    asked = [Example(r.prompt, r.target) for r in requests]
    asked += [Example(r.paraphrases[0], r.target) for r in requests]
    assert not any(exact_match(larimar, asked))  # the untrained base knows none of them
    for experience in parts[0]:
        larimar.train(experience)
    assert all(exact_match(larimar, asked))


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


def test_a_forgetting_edit_grid_runs_through_the_runner_and_logs_forget_success(
    write_grid, tracking_uri
):
    from mlflow import MlflowClient

    from forgetless.experiments.runner import run_grid

    stream = {"name": "pycountry_edits", "subjects": 12, "edits": 4, "edits_per_experience": 1,
              "locality": 4, "reserve": 2, "forget_after": 1,
              "base": {"epochs": 1, "batch_size": 16, "warmup_steps": 0}}  # fmt: skip
    grid = write_grid(
        streams=[stream],
        model={"name": "llama_tiny", "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64,
               "context": 64},
        strategies=[{"name": "larimar", **FAST, "key_steps": 2}],  # forgetting needs no keys
    )  # fmt: skip
    (outcome,) = run_grid(grid, tracking_uri)
    assert outcome.status == "FINISHED", outcome.error
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.name)
    (run,) = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    metrics = run.data.metrics
    for name in ("reliability", "generalization", "locality", "edit_latency_s", "forget_success"):
        assert f"final/{name}" in metrics, name
    # Edits 0 and 2 are forgotten at experiences 1 and 3: the curve starts at step 1.
    history = client.get_metric_history(run.info.run_id, "forget_success")
    assert [m.step for m in history] == [1, 2, 3]
    assert metrics["final/forget_success"] == history[-1].value
    # Every edit's raw result, as an MLflow table; the kept edits' mean is the final score.
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "edits.json")).read_text())
    edits = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [e["forgotten"] for e in edits] == [True, False, True, False]
    kept = [e["reliable"] for e in edits if not e["forgotten"]]
    assert metrics["final/reliability"] == pytest.approx(sum(kept) / len(kept))


def test_the_key_encoder_gives_a_held_out_phrasing_its_own_facts_key():
    """Raw MiniLM keys of pycountry prompts follow their template; trained keys follow the
    fact. 80 facts, each with 7 phrasings to train on and one held out."""
    from forgetless.models.sentence_encoder import sentence_encoder
    from forgetless.strategies.larimar import KeyEncoder, embed, train_key_encoder
    from forgetless.streams.editing import facts

    corpus = facts(["alpha3", "numeric"], 40)
    trained = [Example(f.prompt(t), f.answer) for f in corpus for t in range(8) if t != f.held_out]
    encoder = sentence_encoder("")
    asked = embed(encoder, [f.prompt(f.held_out) for f in corpus])
    written = embed(encoder, [f.prompt((f.held_out + 1) % 8) for f in corpus])

    def nearest_is_own(keys: KeyEncoder) -> float:
        own = (keys(asked) @ keys(written).T).argmax(1) == torch.arange(len(corpus))
        return own.float().mean().item()

    raw = nearest_is_own(KeyEncoder(asked.shape[1]))
    keys = train_key_encoder(KeyEncoder(asked.shape[1]), encoder, trained, LarimarConfig())
    assert raw < 0.7 and nearest_is_own(keys) >= 0.95, raw


@pytest.mark.parametrize(
    ("params", "field"),
    [({"counterfactual": 1.5}, "counterfactual"), ({"key_steps": -1}, "key_steps"),
     ({"scope_threshold": 3.0}, "scope_threshold"), ({"answer_tokens": 1}, "answer_tokens")],
)  # fmt: skip
def test_bad_settings_are_refused_naming_the_field(params, field):
    from forgetless.core.schema import parse

    with pytest.raises(ConfigError, match=f"strategy.{field}"):
        parse(LarimarConfig, params, "strategy")
