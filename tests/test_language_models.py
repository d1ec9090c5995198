"""Language-model cells: scoring by teacher forcing (checked by hand and against greedy
decoding), CausalLM.encode, the built-in instruction tasks, the cached base model, `hf:`
models saved on disk, and a two-task grid run end to end into MLflow."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from torch import nn

from forgetless.core.schema import ConfigError, parse
from forgetless.experiments import base_model, checkpoint
from forgetless.experiments.base_model import base_path, encode_stream, load_or_train_base
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import _generation_counts, evaluate, score_stream
from forgetless.experiments.runner import build_cell, run_grid
from forgetless.models import build_model
from forgetless.models.causal_lm import (
    IGNORE,
    CausalLM,
    HFConfig,
    LlamaTinyConfig,
    bpe_tokenizer,
    llama_tiny,
    lm_loss,
    trim_padding,
)
from forgetless.strategies import NoParams, TrainConfig
from forgetless.strategies.naive import Naive
from forgetless.streams import Example, Experience, Samples, Stream, build_stream
from forgetless.streams.instructions import (
    DEFAULT_TASKS,
    FACTS,
    GENERAL_TASKS,
    STRINGS,
    BaseConfig,
    BaseMixture,
    InstructionsConfig,
    instructions,
    task_examples,
    words,
)

TINY = LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64, context=64)
TINY_DICT = {"name": "llama_tiny", **dataclasses.asdict(TINY)}


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch):
    """Nothing downloads; one thread, since these models are too small to gain from more
    and the test machine is shared."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, config: LlamaTinyConfig = TINY) -> CausalLM:
    torch.manual_seed(seed)
    return llama_tiny(config, None)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ids(model: CausalLM, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False).input_ids


def word_of(example: Example) -> str:
    """The word of a string-task prompt `"<task>: <word>\\n"`."""
    return example.prompt.split(": ", 1)[1].removesuffix("\n")


# --- scores on hand-made predictions ------------------------------------------------------

V = 6  # vocabulary of the hand-made logits
EOS, PAD = 1, 0
# Row 0: prompt [3, 4], answer [5, 2] + EOS, one pad. Row 1: prompt [4, 3], answer [2, 5] + EOS.
TOKENS = torch.tensor([[3, 4, 5, 2, EOS, PAD], [4, 3, 2, 5, EOS, PAD]])
LABELS = torch.tensor([[IGNORE, IGNORE, 5, 2, EOS, IGNORE], [IGNORE, IGNORE, 2, 5, EOS, IGNORE]])
SCALE = 10.0


def one_hot_logits(predicted: list[list[int]]) -> torch.Tensor:
    """Logits whose argmax at position t is predicted[row][t] (the guess for token t + 1)."""
    logits = torch.zeros(len(predicted), len(predicted[0]), V)
    for i, row in enumerate(predicted):
        for t, token in enumerate(row):
            logits[i, t, token] = SCALE
    return logits


# Position t predicts token t + 1. Row 0 gets all 3 scored tokens right; row 1 gets both
# answer tokens right but predicts 5 where the EOS is due. Predictions at positions whose
# next token is prompt or padding are deliberately wrong: they must not count.
PREDICTED = [[0, 5, 2, EOS, 3, 3], [0, 2, 5, 5, 4, 4]]
RIGHT_LOSS = math.log(1 + (V - 1) * math.exp(-SCALE))  # target has the SCALE logit
WRONG_LOSS = math.log(math.exp(SCALE) + V - 1)  # target has logit 0, another has SCALE


def test_generation_counts_on_hand_made_logits():
    counts = _generation_counts(one_hot_logits(PREDICTED), LABELS)
    assert counts["exact"].item() == 1
    assert counts["correct_tokens"].item() == 5
    assert counts["tokens"].item() == 6
    assert counts["loss_sum"].item() == pytest.approx(5 * RIGHT_LOSS + WRONG_LOSS, rel=1e-5)


def test_generation_counts_ignore_predictions_on_prompt_and_padding():
    other = [[row[0] + 1, *row[1:4], (row[4] + 1) % V, 0] for row in PREDICTED]
    a = _generation_counts(one_hot_logits(PREDICTED), LABELS)
    b = _generation_counts(one_hot_logits(other), LABELS)
    assert {k: v.item() for k, v in a.items()} == pytest.approx({k: v.item() for k, v in b.items()})


def test_an_answer_right_but_for_a_missing_eos_is_not_an_exact_match():
    only_row_1 = _generation_counts(one_hot_logits(PREDICTED[1:]), LABELS[1:])
    assert only_row_1["exact"].item() == 0
    assert only_row_1["correct_tokens"].item() == 2


class HandMadeStrategy:
    """What `evaluate` reads of a strategy; row i of the data holds the index i, and the
    logits cover as many positions as the batch's labels (evaluate trims the padding)."""

    def __init__(self, logits: torch.Tensor, eval_batch_size: int) -> None:
        self.model = nn.Linear(1, 1)
        self.device = torch.device("cpu")
        self.train_config = SimpleNamespace(eval_batch_size=eval_batch_size)
        self.hand_made = logits

    def logits(self, batch: Samples) -> torch.Tensor:
        return self.hand_made[batch.x[:, 0], : batch.y.shape[1]]


@pytest.mark.parametrize("eval_batch_size", [1, 2, 512])
def test_evaluate_generation_scores_hand_made_predictions(eval_batch_size):
    strategy = HandMadeStrategy(one_hot_logits(PREDICTED), eval_batch_size)
    data = Samples(torch.arange(2)[:, None], LABELS)
    strategy.model.train()
    scores = evaluate(strategy, data, "generation")
    assert scores == pytest.approx(
        {
            "exact_match": 0.5,
            "token_accuracy": 5 / 6,
            "loss": (5 * RIGHT_LOSS + WRONG_LOSS) / 6,
        },
        rel=1e-5,
    )
    assert strategy.model.training  # the model's mode is restored


def test_evaluate_weights_token_scores_by_tokens_not_rows():
    # Row 0 has 3 scored tokens, all right; a third row has 1 scored token (the EOS), wrong.
    labels = torch.cat([LABELS, torch.tensor([[IGNORE] * 4 + [EOS, IGNORE]])])
    predicted = [*PREDICTED, [0, 0, 0, 2, 0, 0]]
    strategy = HandMadeStrategy(one_hot_logits(predicted), eval_batch_size=2)
    scores = evaluate(strategy, Samples(torch.arange(3)[:, None], labels), "generation")
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["token_accuracy"] == pytest.approx(5 / 7)


# --- teacher-forced exact match is greedy decoding ---------------------------------------


def test_teacher_forced_exact_match_agrees_with_greedy_generation_example_by_example():
    torch.manual_seed(0)
    model = llama_tiny(LlamaTinyConfig(layers=2, hidden=64, heads=4, intermediate=128), None)
    train, held_out = task_examples("uppercase", 32, 8, seed=0)
    examples = [
        *train[:16],  # trained on: mostly right
        *held_out,  # never seen: mostly wrong
        # Trained prompts with an answer one letter short or one letter long: the model
        # writes the trained answer, so only the EOS position decides exact match.
        *(Example(e.prompt, e.answer[:-1]) for e in train[16:24]),
        *(Example(e.prompt, e.answer + "S") for e in train[24:32]),
    ]
    width = model.width(examples)
    experience = Experience(0, "uppercase", model.encode(train, width), None, kind="generation")
    config = TrainConfig(epochs=60, batch_size=32, lr=3e-3, optimizer="adamw")
    strategy = Naive(model, NoParams(), config, Stream("s", "instruction", [experience]))
    strategy.train(experience)

    data = model.encode(examples, width)
    forced = [
        evaluate(strategy, data.subset(torch.tensor([i])), "generation")["exact_match"] == 1.0
        for i in range(len(examples))
    ]
    generated = model.generate([e.prompt for e in examples])
    greedy = [text == e.answer for text, e in zip(generated, examples)]

    disagree = [(e, text) for e, text, f, g in zip(examples, generated, forced, greedy) if f != g]
    assert not disagree
    # Both outcomes occur, so the comparison could fail; the altered answers are all wrong.
    assert any(forced) and not all(forced)
    assert not any(forced[24:])
    assert sum(forced[:16]) >= 12
    # and the mean is the exact match of the batched pass
    batched = evaluate(strategy, data, "generation")["exact_match"]
    assert batched == pytest.approx(sum(forced) / len(forced))


# --- CausalLM.encode ------------------------------------------------------------------------


def test_encode_labels_only_the_answer_and_eos_and_pads_to_the_longest():
    model = tiny_model()
    examples = [Example("ab:", "XY"), Example("é:", "Z")]  # 'é' is two bytes
    samples = model.encode(examples)
    eos, pad = model.tokenizer.eos_token_id, model.pad_id
    rows = [
        ids(model, "ab:") + ids(model, "XY") + [eos],
        ids(model, "é:") + ids(model, "Z") + [eos],
    ]
    width = max(len(r) for r in rows)
    assert samples.x.shape == samples.y.shape == (2, width)
    assert samples.x.dtype == samples.y.dtype == torch.long
    for i, (example, row) in enumerate(zip(examples, rows)):
        n_prompt = len(ids(model, example.prompt))
        assert samples.x[i].tolist() == row + [pad] * (width - len(row))
        expected = [IGNORE] * n_prompt + row[n_prompt:] + [IGNORE] * (width - len(row))
        assert samples.y[i].tolist() == expected
        assert row[-1] == eos
    assert model.width(examples) == width


def test_encode_with_label_prompts_labels_every_token_but_the_padding():
    model = tiny_model()
    samples = model.encode([Example("ab:", "XY"), Example("é:", "Z")], label_prompts=True)
    real = samples.x != model.pad_id
    assert torch.equal(samples.y[real], samples.x[real])
    assert (samples.y[~real] == IGNORE).all()


def test_the_base_learns_prompts_only_when_its_config_asks(cache, monkeypatch):
    seen = []
    encode = CausalLM.encode
    monkeypatch.setattr(
        CausalLM, "encode", lambda self, e, *a, **k: seen.append(k) or encode(self, e, *a, **k)
    )
    for learn in (True, False):
        load_or_train_base(tiny_model(), small_base(learn_prompts=learn), TINY_DICT)
    assert [k.get("label_prompts") for k in seen] == [True, False]


def test_encode_width_argument_right_pads_with_pad_and_ignored_labels():
    model = tiny_model()
    examples = [Example("ab:", "XY"), Example("a:", "Z")]
    natural = model.encode(examples)
    wide = model.encode(examples, width=natural.x.shape[1] + 4)
    assert wide.x.shape == (2, natural.x.shape[1] + 4)
    assert torch.equal(wide.x[:, : natural.x.shape[1]], natural.x)
    assert torch.equal(wide.y[:, : natural.y.shape[1]], natural.y)
    assert (wide.x[:, natural.x.shape[1] :] == model.pad_id).all()
    assert (wide.y[:, natural.y.shape[1] :] == IGNORE).all()
    # Sets encoded with one width concatenate (replay buffers, cumulative training).
    other = model.encode([Example("z:", "Q")], width=wide.x.shape[1])
    assert Samples.concat([wide, other]).x.shape == (3, wide.x.shape[1])


def test_encode_refuses_an_example_longer_than_the_context():
    model = tiny_model(config=dataclasses.replace(TINY, context=8))
    model.encode([Example("abcd", "efg")])  # 4 + 3 + EOS = 8 tokens: fits exactly
    with pytest.raises(ConfigError, match="model.context") as error:
        model.encode([Example("abcd", "efgh")])
    assert "9 tokens" in str(error.value) and "context is 8" in str(error.value)


def bpe_model() -> CausalLM:
    """A CausalLM whose tokenizer merges across the prompt/answer boundary: 'ab'+'c' -> 'abc'."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "<eos>": 5, "<pad>": 6}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "c")]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    return CausalLM(nn.Linear(1, 1), tokenizer, max_length=16)


def test_encode_stream_fits_rows_of_a_tokenizer_that_merges_across_the_boundary():
    model = bpe_model()
    example = Example("ab", "c")  # apart: [ab] [c] [eos]; together: [abc]
    stream = Stream("s", "instruction", [Experience(0, "t", [example], [example], "generation")])
    encoded = encode_stream(stream, model)
    assert encoded.experiences[0].train.x[0].tolist() == [3, 2, 5]
    assert encoded.experiences[0].train.y[0].tolist() == [IGNORE, 2, 5]


def test_bpe_tokenizer_keeps_a_word_one_token_wherever_it_stands_and_is_deterministic():
    texts = ["The alpha-3 code of Cuba is CUB", "Cuba's numeric code is 192", "numeric(Peru) = 604"]
    texts = texts * 20 + ["Three-digit ISO code of Peru: 604"]
    tokenizer = bpe_tokenizer(texts, vocab=300)
    cuba = tokenizer("Cuba", add_special_tokens=False).input_ids
    assert len(cuba) == 1  # a word of the corpus is one token
    for text in ("numeric(Cuba) = ", "Cuba's code", "Three-digit ISO code of Cuba: "):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert cuba[0] in ids  # the same token after "(", at the start, before ":"
        assert tokenizer.decode(ids) == text
    unseen = "Ünïcode, never seen: {x}"
    assert tokenizer.decode(tokenizer(unseen, add_special_tokens=False).input_ids) == unseen
    again = bpe_tokenizer(texts, vocab=300)
    assert again.get_vocab() == tokenizer.get_vocab()


def test_a_bpe_tiny_llama_learns_its_vocabulary_from_the_base_corpus_and_needs_one():
    corpus = [Example("The alpha-3 code of Cuba is ", "CUB")] * 10
    base = BaseMixture(BaseConfig(), corpus)
    config = LlamaTinyConfig(
        layers=1, hidden=16, heads=2, intermediate=32, tokenizer="bpe", vocab=300
    )
    model = llama_tiny(config, Stream("s", "instruction", [], base=base))
    assert model.model.config.vocab_size == len(model.tokenizer) <= 300
    assert len(model.tokenizer("Cuba", add_special_tokens=False).input_ids) == 1
    with pytest.raises(ConfigError, match="model.tokenizer: bpe .* stream 's' has none"):
        llama_tiny(config, Stream("s", "instruction", []))
    with pytest.raises(ConfigError, match="model.vocab: .* at least 260"):
        parse(LlamaTinyConfig, {"tokenizer": "bpe", "vocab": 259}, "model")


def test_a_grid_pairing_a_bpe_model_with_a_stream_without_base_fails_before_any_cell():
    model = {"name": "llama_tiny", "tokenizer": "bpe"}
    no_base = {"name": "instructions", "base": None}
    with pytest.raises(ConfigError, match=r"model.tokenizer: .* streams\[0\] \(instructions\)"):
        grid_from_dict({"name": "g", "streams": [no_base], "strategies": ["naive"], "model": model})
    grid = grid_from_dict({"name": "g", "streams": ["instructions"], "strategies": ["naive"],
                           "model": model})  # fmt: skip
    assert grid.cells[0].config["model"]["tokenizer"] == "bpe"


# --- built-in tasks ---------------------------------------------------------------------


def test_words_split_once_into_disjoint_train_and_held_out_words():
    train_words, test_words = words()
    assert not set(train_words) & set(test_words)
    assert len(train_words) == int(0.7 * (len(train_words) + len(test_words)))
    for w in (*train_words, *test_words):
        assert w.isalpha() and w.islower() and 3 <= len(w) <= 8


def test_string_tasks_are_scored_on_words_no_training_set_contains():
    train_words, test_words = set(words()[0]), set(words()[1])
    trained, tested = set(), set()
    for task, rule in STRINGS.items():
        for seed in (0, 1):
            train, test = task_examples(task, 200, 100, seed)
            assert len(train) == 200 and len(test) == 100
            for example in (*train, *test):
                assert example.prompt == f"{task}: {word_of(example)}\n"
                assert example.answer == rule(word_of(example))
            trained |= {word_of(e) for e in train}
            tested |= {word_of(e) for e in test}
            assert len({word_of(e) for e in test}) == 100  # held-out words drawn without repeats
    # the base mixture trains on words too
    base = instructions(InstructionsConfig(), 0).base
    trained |= {word_of(e) for e in base.train if e.prompt.split(":")[0] in STRINGS}
    assert trained <= train_words and tested <= test_words
    assert not trained & tested


@pytest.mark.parametrize("task", sorted(FACTS))
def test_fact_tasks_are_scored_on_facts_they_trained_on(task):
    train, test = task_examples(task, 50, 20, seed=3)
    assert len(train) == 50 and len(test) == 20
    assert set(test) <= set(train)
    facts = dict(FACTS[task]())
    for example in train:
        question = example.prompt.removeprefix(f"{task}: ").removesuffix("\n")
        assert facts[question] == example.answer


def test_a_fact_task_with_more_examples_than_facts_repeats_every_fact_evenly():
    n = len(FACTS["country_alpha3"]())
    train, test = task_examples("country_alpha3", 2 * n + 10, 20, seed=1)
    assert len(train) == 2 * n + 10
    counts = collections.Counter(train)
    assert len(counts) == n  # every fact, none invented
    assert sorted(set(counts.values())) == [2, 3]  # two full passes, then 10 more
    assert train[n : 2 * n] != train[:n]  # each pass in a fresh order
    assert set(test) <= set(train[:n]) and len(set(test)) == 20


def test_instructions_stream_is_determined_by_the_seed():
    config = InstructionsConfig(tasks=["country_alpha3", "reverse"], train_size=20, test_size=10)
    a, b, c = instructions(config, 5), instructions(config, 5), instructions(config, 6)
    assert [(e.train, e.test) for e in a] == [(e.train, e.test) for e in b]
    assert a.general == b.general and a.base.train == b.base.train
    assert [e.train for e in a] != [e.train for e in c]
    # The base mixture and its held-out set do not depend on the cell seed.
    assert a.base.train == c.base.train and a.general == c.general


def test_default_instructions_stream_is_a_generation_stream_over_the_default_tasks():
    config = InstructionsConfig()
    stream = build_stream("instructions", config, 0)
    assert stream.kind == "generation" and stream.scenario == "instruction"
    assert [e.name for e in stream] == DEFAULT_TASKS
    assert all(e.kind == "generation" and e.info["task"] == e.name for e in stream)
    assert [len(e.train) for e in stream] == [config.train_size] * len(DEFAULT_TASKS)
    assert [len(e.test) for e in stream] == [config.test_size] * len(DEFAULT_TASKS)
    assert isinstance(stream.base, BaseMixture)
    assert stream.base.config.tasks == GENERAL_TASKS
    assert not set(GENERAL_TASKS) & set(DEFAULT_TASKS)
    base = config.base
    assert len(stream.base.train) == base.train_size * len(GENERAL_TASKS)
    available = {t: len(FACTS[t]()) if t in FACTS else base.general_size for t in GENERAL_TASKS}
    assert len(stream.general) == sum(min(base.general_size, n) for n in available.values())


def test_a_generation_grid_defaults_to_the_tiny_llama():
    grid = grid_from_dict({"name": "lm", "streams": ["instructions"], "strategies": ["naive"]})
    assert grid.cells[0].config["model"]["name"] == "llama_tiny"


# --- the cached base model -------------------------------------------------------------------


def small_base(**changes) -> BaseMixture:
    base = BaseConfig(tasks=["last_letter"], train_size=8, epochs=1, batch_size=8, general_size=2)
    config = InstructionsConfig(tasks=["uppercase"], train_size=4, test_size=2)
    config.base = dataclasses.replace(base, **changes)
    return instructions(config, 0).base


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_base_is_trained_once_then_loaded_from_the_cache(cache, monkeypatch):
    base = small_base()
    first = tiny_model(seed=1)
    init = state(first)
    path = load_or_train_base(first, base, TINY_DICT)
    assert path.is_file() and path.suffix == ".safetensors"
    assert path.parent == cache / "base"
    assert not same_weights(state(first), init)  # it trained
    assert same_weights(load_file(str(path)), state(first))
    assert sorted(p.name for p in path.parent.iterdir() if p.suffix == ".tmp") == []

    def no_training(*args):
        raise AssertionError("the cached base was trained again")

    monkeypatch.setattr(base_model, "_train_base", no_training)
    second = tiny_model(seed=2)
    assert not same_weights(state(second), state(first))
    assert load_or_train_base(second, base, TINY_DICT) == path
    assert same_weights(state(second), state(first))


def test_base_cache_file_is_keyed_by_base_and_model_config(cache):
    base = small_base()
    path = base_path(TINY_DICT, base)
    assert path == base_path(dict(TINY_DICT), small_base())
    assert base_path(TINY_DICT, small_base(epochs=2)) != path
    assert base_path(TINY_DICT, small_base(tasks=["reverse"])) != path
    assert base_path({**TINY_DICT, "hidden": 64}, base) != path
    # A field at its default (as a newer forgetless adds one) keeps the cached base.
    assert base_path({**TINY_DICT, "gradient_checkpointing": False}, base) == path
    hf = base_path({**TINY_DICT, "name": "hf:/models/x"}, base)
    assert cache / "base" in hf.parents and hf.suffix == ".safetensors"


def test_training_the_base_leaves_the_cell_rng_where_it_was(cache):
    model = tiny_model(seed=7)
    before = checkpoint.rng_state()
    load_or_train_base(model, small_base(), TINY_DICT)
    after = checkpoint.rng_state()
    assert torch.equal(before["torch"], after["torch"])
    assert before["python"] == after["python"]
    assert torch.equal(before["numpy"]["keys"], after["numpy"]["keys"])
    assert before["numpy"]["pos"] == after["numpy"]["pos"]
    draws = (torch.rand(1).item(), np.random.rand(), random.random())
    checkpoint.set_rng_state(before)
    assert draws == (torch.rand(1).item(), np.random.rand(), random.random())


def test_cached_base_does_not_depend_on_the_seed_of_the_cell_that_trained_it(tmp_path, monkeypatch):
    # Two cells that differ only by seed, each the first to need the base on its node.
    base = dataclasses.asdict(small_base().config)
    stream = {"name": "instructions", "tasks": ["uppercase"], "train_size": 4, "test_size": 2,
              "base": base}  # fmt: skip
    spec = {"name": "b", "streams": [stream], "model": TINY_DICT, "strategies": ["naive"]}
    weights = []
    for seed in (1, 2):
        monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / f"node{seed}"))
        (cell,) = grid_from_dict({**spec, "seeds": [seed]}).cells
        _, strategy = build_cell(cell, "cpu")
        weights.append(state(strategy.model))
    assert same_weights(*weights)


# --- hf:<path> models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_hf_model(tmp_path_factory) -> Path:
    """A tiny LlamaForCausalLM and its byte-level tokenizer, saved with save_pretrained."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_model_saved_on_disk_loads_and_runs(saved_hf_model):
    from transformers import LlamaForCausalLM

    model = build_model(f"hf:{saved_hf_model}", HFConfig(context=64), None)
    assert isinstance(model, CausalLM) and model.max_length == 64
    original = LlamaForCausalLM.from_pretrained(saved_hf_model)
    assert same_weights(state(model.model), state(original))
    samples = model.encode([Example("uppercase: abc\n", "ABC"), Example("x:", "y")])
    logits = model(samples.x)
    assert logits.shape == (*samples.x.shape, len(model.tokenizer))
    assert torch.allclose(logits, original(input_ids=samples.x).logits, atol=1e-5)
    texts = model.generate(["uppercase: abc\n", "x:"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_hf_model_dtype_is_applied(saved_hf_model):
    model = build_model(f"hf:{saved_hf_model}", HFConfig(dtype="bfloat16"), None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_hf_model_builds_in_a_cell_from_the_grid(saved_hf_model):
    grid = grid_from_dict(
        {
            "name": "hf",
            "streams": [{"name": "instructions", "tasks": ["uppercase", "reverse"],
                         "train_size": 4, "test_size": 2, "base": None}],
            "model": {"name": f"hf:{saved_hf_model}", "context": 64},
            "strategies": ["naive"],
        }
    )  # fmt: skip
    stream, strategy = build_cell(grid.cells[0], "cpu")
    assert isinstance(strategy.model, CausalLM)
    assert stream.experiences[0].train.x.shape[0] == 4
    row, extra = score_stream(strategy, stream)
    assert len(row) == 2 and "token_accuracy/exp_1" in extra


def test_hf_path_without_config_json_is_not_a_saved_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a saved model") as error:
        build_model(f"hf:{tmp_path}", HFConfig(), None)
    assert str(tmp_path) in str(error.value) and "save_pretrained" in str(error.value)


# --- a two-task stream end to end ------------------------------------------------------------


def test_two_task_stream_runs_end_to_end_into_mlflow(
    write_grid, tracking_uri, cache, tmp_path, monkeypatch
):
    trained = []
    train_base = base_model._train_base
    monkeypatch.setattr(base_model, "_train_base", lambda *a: trained.append(1) or train_base(*a))
    # A base of 4 memorised facts learns to answer its held-out set (the same facts), so
    # general_retention has a non-zero denominator.
    base = {"tasks": ["alpha2_alpha3"], "train_size": 4, "general_size": 4,
            "epochs": 60, "batch_size": 4, "lr": 0.005}  # fmt: skip
    grid = write_grid(
        streams=[{"name": "instructions", "tasks": ["uppercase", "reverse"], "train_size": 8,
                  "test_size": 4, "base": base}],
        model={**TINY_DICT, "context": 48},
        strategies=["naive", "cumulative"],
        train={"epochs": 1, "batch_size": 8, "lr": 1e-3, "optimizer": "adamw"},
    )  # fmt: skip
    outcomes = run_grid(grid, tracking_uri)
    assert [o.status for o in outcomes] == ["FINISHED", "FINISHED"], [o.error for o in outcomes]
    assert trained == [1]  # the second cell loaded the cached base
    assert len(list((cache / "base").glob("*.safetensors"))) == 1

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.name)
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`forgetless.role` = 'cell'", max_results=10
    )
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        metrics = run.data.metrics
        assert "final/general_retention" in metrics
        general = client.get_metric_history(run.info.run_id, "general_acc")
        assert [m.step for m in general] == [0, 1]
        history = client.get_metric_history(run.info.run_id, "token_accuracy/exp_0")
        assert [m.step for m in history] == [0, 1]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert len(client.get_metric_history(run.info.run_id, "loss/exp_1")) == 2
        local = client.download_artifacts(run.info.run_id, "accuracy_matrix.json", str(tmp_path))
        matrix = json.loads(Path(local).read_text())
        assert matrix["score"] == "exact_match"
        assert matrix["experiences"] == ["uppercase", "reverse"]
        assert np.array(matrix["R"]).shape == (2, 2)

    # general_retention is the final general score over the base model's own.
    stream, strategy = build_cell(grid.cells[0], "cpu")
    base_general = score_stream(strategy, stream)[1]["general_acc"]
    assert base_general > 0
    run = next(r for r in runs if r.data.tags["forgetless.cell_hash"] == grid.cells[0].hash)
    final_general = client.get_metric_history(run.info.run_id, "general_acc")[-1].value
    assert run.data.metrics["final/general_retention"] == pytest.approx(
        final_general / base_general
    )


def test_trim_padding_keeps_every_labelled_position_and_the_model_outputs_there():
    torch.manual_seed(0)
    model = llama_tiny(LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64), None)
    data = model.encode([Example("a: x\n", "X"), Example("abc: xyz\n", "XYZ")], width=30)
    trimmed = trim_padding(data)
    assert trimmed.x.shape == (2, len("abc: xyz\n") + len("XYZ") + 1)  # + EOS
    assert (data.y[:, trimmed.y.shape[1] :] == IGNORE).all()
    assert (data.x[:, trimmed.x.shape[1] :] == model.pad_id).all()
    with torch.no_grad():
        full, short = model(data.x), model(trimmed.x)
    assert torch.allclose(full[:, : short.shape[1]], short, atol=1e-5)
    assert lm_loss(full, data.y).item() == pytest.approx(lm_loss(short, trimmed.y).item(), rel=1e-5)
