"""Lifelong editing: edit streams, loaders, edit scoring and the editors on tiny models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from shared_data import SHARED_DATA
from torch import nn

from forgetless.core.schema import ConfigError, parse
from forgetless.experiments.editing import (
    applied_scores,
    cache_locality,
    edit_summary,
    encode_edit_stream,
)
from forgetless.experiments.evaluate import edit_results, score_edits
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.strategies import TrainConfig
from forgetless.streams import Example
from forgetless.streams.editing import (
    RELATIONS,
    EditRequest,
    PycountryEditsConfig,
    edit_stream,
    load_counterfact,
    load_zsre,
    pycountry_edits,
)

SMALL = {"subjects": 12, "edits": 4, "edits_per_experience": 2, "locality": 4, "reserve": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaTinyConfig(layers=layers, hidden=32, heads=2, intermediate=64, context=64)
    return llama_tiny(config, None).eval()


# --- the stream ------------------------------------------------------------------------


def test_pycountry_edits_hold_counterfactuals_of_the_same_relation_and_a_held_out_paraphrase():
    stream = pycountry_edits(parse(PycountryEditsConfig, SMALL, "stream"), seed=0)
    assert stream.kind == "edit" and stream.scenario == "editing" and len(stream) == 2
    requests = [r for e in stream for r in e.train]
    assert len(requests) == 4
    trained = {(e.prompt, e.answer) for e in stream.base.train}
    for r in requests:
        assert r.target != r.original and r.target and len(r.paraphrases) == 1
        assert (r.prompt, r.original) in trained  # the base model learned the edited fact
        assert (r.paraphrases[0], r.original) not in trained  # held out of the corpus
        assert not any(r.paraphrases[0] == p for p, _ in trained)
        forms = [t.split("{}") for t in RELATIONS[r.relation][1]]
        answers = {a for p, a in trained
                   if any(p.startswith(b) and p.endswith(e) for b, e in forms)}  # fmt: skip
        assert r.target in answers  # drawn from the same relation's answers
    edited = {r.subject for r in requests}
    assert not any(s in e.prompt for e in stream.general for s in edited)
    for r in requests:  # the editors' unrelated prompt: neither edited nor scored
        assert len(set(r.loc_prompts)) == 8  # the default, distinct
        for unrelated in r.loc_prompts:
            assert not any(s in unrelated for s in edited)
            assert not any(e.prompt in unrelated for e in stream.general)
    # 12 subjects x 2 relations x 7 of 8 templates
    assert len(stream.base.train) == 12 * 2 * 7 and len(stream.base.paraphrases) == 24


def test_pycountry_edits_differ_by_seed_but_share_one_base_corpus():
    config = parse(PycountryEditsConfig, SMALL, "stream")
    a, b = pycountry_edits(config, 0), pycountry_edits(config, 1)
    assert a.base.train == b.base.train and a.base.config == b.base.config
    edits = [r for e in a for r in e.train]
    assert edits != [r for e in b for r in e.train]
    assert edits == [r for e in pycountry_edits(config, 0) for r in e.train]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"relations": ["alpha4"]}, "relations[0]"),
        ({**SMALL, "edits": 3}, "edits"),
        ({**SMALL, "edits": 40}, ""),
        ({**SMALL, "reserve": 7}, ""),
        ({**SMALL, "loc_prompts": 33}, "loc_prompts"),  # 2 reserve x 2 relations x 8 templates
        ({**SMALL, "loc_prompts": 0}, "loc_prompts"),
    ],
)
def test_pycountry_edits_refuse_bad_parameters_naming_the_field(params, field):
    with pytest.raises(ConfigError, match=re.escape(f"stream.{field}:" if field else "raise")):
        parse(PycountryEditsConfig, params, "stream")


def test_an_empty_target_is_refused_and_overlapping_locality_dropped(caplog):
    good = EditRequest("France", "alpha3", "The alpha-3 code of France is ", "DEU", "FRA")
    empty = EditRequest("Peru", "alpha3", "The alpha-3 code of Peru is ", " ", "PER")
    with pytest.raises(ConfigError, match="edit 1 .'Peru'.: empty target"):
        edit_stream("s", [good, empty], 1, [Example("x", "y")])
    locality = [Example("alpha3(France) = ", "FRA"), Example("alpha3(Peru) = ", "PER")]
    stream = edit_stream("s", [good], 1, locality)
    assert stream.general == [locality[1]]
    assert "dropped 1 locality prompts" in caplog.text


# --- EasyEdit's files ------------------------------------------------------------------


def test_load_zsre_and_counterfact_read_the_real_samples():
    requests, locality = load_zsre(f"{SHARED_DATA}/zsre/zsre_mend_train.sample.json")
    assert len(requests) == len(locality) == 60
    assert requests[0] == EditRequest(
        "UniFirst", "zsre", "What is the product made by UniFirst?", "unmanned aircraft",
        "uniform", ("What will be the product of UniFirst?",),
    )  # fmt: skip
    assert locality[0].answer == "Walter Sobchak"
    requests, locality = load_counterfact(f"{SHARED_DATA}/counterfact/counterfact-edit.sample.json")
    assert len(requests) == 60
    assert (requests[0].target, requests[0].original) == ("English", "French")
    assert locality[0] == Example("Michel Rocard is a native speaker of", "French")


def test_load_counterfact_reads_roms_nested_form(tmp_path):
    record = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "D. D.",
                              "relation_id": "P103", "target_new": {"str": "English"},
                              "target_true": {"str": "French"}},
        "paraphrase_prompts": ["D. D. speaks"], "neighborhood_prompts": ["M. R. speaks"],
    }  # fmt: skip
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([record]))
    (request,), locality = load_counterfact(path)
    assert request == EditRequest(
        "D. D.", "P103", "The mother tongue of D. D. is", "English", "French", ("D. D. speaks",)
    )
    assert locality == [Example("M. R. speaks", "French")]


def test_loaders_name_the_record_and_the_missing_field(tmp_path):
    path = tmp_path / "zsre.json"
    good = {"subject": "a", "src": "q?", "alt": "b", "pred": "c", "rephrase": "q2?",
            "loc": "nq", "loc_ans": "x"}  # fmt: skip
    path.write_text(json.dumps([good, {**good, "rephrase": None}]))
    with pytest.raises(ConfigError, match="record 1: missing field 'rephrase'"):
        load_zsre(path)
    path.write_text(json.dumps([{"prompt": "p", "subject": "s"}]))
    with pytest.raises(ConfigError, match="record 0: missing field 'target_new'"):
        load_counterfact(path)


# --- scoring ---------------------------------------------------------------------------


class NextTokenOracle(nn.Module):
    """Predicts the true next token, except in rows whose prompt contains a word of `wrong`."""

    def __init__(self, wrong: set[str]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.tokenizer = tiny_model().tokenizer
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*x.shape, len(self.tokenizer))
        following = torch.cat([x[:, 1:], x[:, -1:]], dim=1)
        logits.scatter_(2, following.unsqueeze(-1), 1.0)
        for i, row in enumerate(x.tolist()):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            if any(w in text for w in self.wrong):
                logits[i] = 0
                logits[i, :, 7] = 1  # a wrong token everywhere
        return logits


class Scored:
    """Just what the evaluator reads from a strategy."""

    def __init__(self, model) -> None:
        self.model, self.device = model, torch.device("cpu")
        self.train_config = TrainConfig()

    def logits(self, batch):
        return self.model(batch.x)


def test_edit_scores_on_hand_made_predictions():
    requests = [
        EditRequest("Aa", "r", "Aa is ", "X", "Y", ("aa = ",)),
        EditRequest("Bb", "r", "Bb is ", "X", "Y", ("bb = ",)),
        EditRequest("Cc", "r", "Cc is ", "X", "Y", ("cc = ",)),
        EditRequest("Dd", "r", "Dd is ", "X", "Y", ("dd = ",)),
    ]
    locality = [Example("Ee is ", "Y"), Example("Ff is ", "Y")]
    stream = edit_stream("s", requests, 2, locality)
    model = tiny_model()
    stream = encode_edit_stream(stream, model)
    # The oracle gets wrong: the prompt of Bb, the paraphrases of Cc and Dd, locality Ff.
    scored = Scored(NextTokenOracle({"Bb is", "cc =", "dd =", "Ff is"}))
    row, extra = score_edits(scored, stream)
    assert row == [0.5, 1.0]
    assert extra["generalization/exp_0"] == 1.0 and extra["generalization/exp_1"] == 0.0
    assert extra["locality"] == 0.5
    assert extra["reliability"] == 0.75 and extra["generalization"] == 0.5
    # Token accuracy counts the "X" and EOS of a right row (2 of 2) and neither of a wrong one.
    assert extra["reliability_token_acc"] == 0.75
    import numpy as np

    R = np.array([[0.5, 0.0], row])
    assert applied_scores(R, 0, extra, stream)["reliability"] == 0.5
    assert applied_scores(R, 1, extra, stream)["edits_applied"] == 4
    assert edit_summary(extra, stream, train_time_s=2.0)["edit_latency_s"] == 0.5
    table = edit_results(scored, stream)
    assert table["subject"] == ["Aa", "Bb", "Cc", "Dd"] and table["experience"] == [0, 0, 1, 1]
    assert table["reliable"] == [True, False, True, True]
    assert table["generalization"] == [1.0, 1.0, 0.0, 0.0]
    assert table["forgotten"] == [False] * 4 and table["target"] == ["X"] * 4


def test_a_forgetting_stream_asks_to_forget_every_other_experience_k_later():
    params = {**SMALL, "subjects": 20, "edits": 10, "edits_per_experience": 1}
    config = parse(PycountryEditsConfig, {**params, "forget_after": 3}, "stream")
    experiences = pycountry_edits(config, seed=0).experiences
    asks = {e.index: e.info["forget"] for e in experiences if "forget" in e.info}
    assert asks == {k + 3: experiences[k].train for k in (0, 2, 4, 6)}
    due = {e.index: e.info["forgotten_at"] for e in experiences if "forgotten_at" in e.info}
    assert due == {0: 3, 2: 5, 4: 7, 6: 9}  # 8 + 3 is past the stream: edit 8 is kept
    with pytest.raises(ConfigError, match=r"stream.forget_after: 10 is not in \[0, 9\]"):
        parse(PycountryEditsConfig, {**params, "forget_after": 10}, "stream")


def test_forget_success_and_the_kept_edits_scores_on_hand_made_predictions():
    import numpy as np

    requests = [EditRequest(s, "r", f"{s} is ", "X", "Y", (f"{s.lower()} = ",))
                for s in ("Aa", "Bb", "Cc", "Dd")]  # fmt: skip
    stream = edit_stream("s", requests, 1, [Example("Ee is ", "Y")], forget_after=1)
    stream = encode_edit_stream(stream, tiny_model())
    # Edits 0 and 2 are forgotten at 1 and 3. The oracle gets Aa's prompt wrong: the
    # pre-edit answer of a forgotten edit (and its new target), so 1 of 2 forgets succeed.
    row, extra = score_edits(Scored(NextTokenOracle({"Aa is"})), stream)
    assert row == [0.0, 1.0, 1.0, 1.0]
    assert extra["forget/exp_0"] == 0.0 and extra["forget/exp_2"] == 1.0
    assert "forget/exp_1" not in extra and extra["reliability"] == 1.0  # over the kept edits
    R = np.tile(row, (4, 1))
    assert applied_scores(R, 0, extra, stream)["reliability"] == 0.0  # edit 0 still held
    assert "forget_success" not in applied_scores(R, 0, extra, stream)
    assert applied_scores(R, 1, extra, stream)["forget_success"] == 0.0
    assert applied_scores(R, 1, extra, stream)["reliability"] == 1.0  # edit 1 alone held
    assert applied_scores(R, 3, extra, stream)["forget_success"] == 0.5
    assert edit_summary(extra, stream, train_time_s=4.0)["forget_success"] == 0.5
    table = edit_results(Scored(NextTokenOracle({"Aa is"})), stream)
    assert table["forgotten"] == [True, False, True, False]
    assert table["reliable"] == [False, True, True, True]


def test_a_forgetting_stream_is_refused_for_an_editor_that_cannot_forget():
    from forgetless.experiments.config import grid_from_dict

    spec = {"name": "pycountry_edits", **SMALL, "forget_after": 1}
    with pytest.raises(ConfigError, match=r"streams\[0\].forget_after: strategy 'ft_l' cannot"):
        grid_from_dict({"name": "g", "streams": [spec], "strategies": ["ft_l"]})


def test_locality_answers_are_the_models_own_greedy_outputs():
    model = tiny_model()
    prompts = [Example("alpha3(Peru) = ", "PER"), Example("Q: x? A: ", "Y")]
    cached = cache_locality(model, prompts, max_new_tokens=5)
    scored = Scored(model)
    from forgetless.experiments.evaluate import evaluate

    assert evaluate(scored, cached, "generation")["exact_match"] == 1.0
    generated = model.generate([p.prompt for p in prompts], max_new_tokens=5)
    for i, text in enumerate(generated):
        labelled = cached.y[i][cached.y[i] != -100].tolist()
        assert model.tokenizer.decode(labelled, skip_special_tokens=True) == text


# --- editors ---------------------------------------------------------------------------


def one_edit_stream(model):
    """One edit (and a locality prompt), encoded for `model` with its answers cached."""
    request = EditRequest("Peru", "alpha3", "The alpha-3 code of Peru is ", "DEU", "PER",
                          ("alpha3(Peru) = ",), ("The alpha-3 code of Chad is TCD",))  # fmt: skip
    locality = [Example("The alpha-3 code of Chile is ", "CHL"), Example("Q: x? A: ", "Y")]
    return encode_edit_stream(edit_stream("one", [request], 1, locality), model)


def editor(cls, model, stream, **params):
    return cls(model, parse(cls.Config, params, "strategy"), TrainConfig(), stream)


def test_ft_l_makes_one_edit_hold_changing_only_its_layer_within_the_norm_constraint():
    from forgetless.strategies.ft_l import FTL

    model = tiny_model()
    stream = one_edit_stream(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = editor(FTL, model, stream, layer=1, lr=0.05, steps=60, norm_constraint=0.5)
    strategy.train(stream.experiences[0])
    row, _ = score_edits(strategy, stream)
    assert row == [1.0]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == ["model.model.layers.1.mlp.down_proj.weight"]
    delta = (model.state_dict()[changed[0]] - before[changed[0]]).abs().max()
    assert 0 < delta <= 0.5 + 1e-6


def test_editors_refuse_a_layer_the_model_lacks():
    from forgetless.strategies.ft_l import FTL

    model = tiny_model()
    with pytest.raises(ConfigError, match="strategy.layer: the model has no layer 5.*layers 0-1"):
        editor(FTL, model, one_edit_stream(model), layer=5)


def test_grace_retrieves_one_edit_and_leaves_inputs_outside_its_radius_untouched():
    from forgetless.strategies.grace import Grace

    model = tiny_model()
    stream = one_edit_stream(model)
    with torch.no_grad():
        before = model(stream.general.x)
    # Inputs of this random model's layer 1 are about 0.05 apart: a radius well below.
    strategy = editor(Grace, model, stream, layer=1, eps=0.002, steps=40, keys="answer")
    strategy.train(stream.experiences[0])
    row, extra = score_edits(strategy, stream)
    assert row == [1.0] and extra["locality"] == 1.0
    with torch.no_grad():  # nothing near the key: exactly the pre-edit logits
        assert torch.equal(model(stream.general.x), before)
    assert len(strategy.codebook.keys) == 4  # "D", "E", "U" and the EOS, one key each
    assert strategy.memory_bytes() == 4 * 4 * (64 + 1 + 32)


def test_grace_splits_the_balls_of_two_close_keys_with_different_labels():
    from forgetless.strategies.grace import Grace

    model = tiny_model()
    stream = one_edit_stream(model)
    strategy = editor(Grace, model, stream, layer=1, eps=1.0, steps=1)
    prompt = "The alpha-3 code of Peru is "
    strategy.edit(prompt, "DEU")
    strategy.edit(prompt + " ", "FRA")  # one key each (last_prompt), close together
    book = strategy.codebook
    d = torch.dist(book.keys[0], book.keys[1]).item()
    assert len(book.keys) == 2 and d < 2
    assert book.radii.tolist() == pytest.approx([d / 2 - 1e-5, d / 2], abs=1e-4)
    strategy.edit(prompt + " ", "FRA")  # same label again: no new key
    assert len(book.keys) == 2


def wise(model, stream, seed=0, **params):
    from forgetless.strategies.wise import Wise

    torch.manual_seed(seed)
    # This random model's layer inputs are about 0.05 long: margins, step and constraint
    # scaled to them (the defaults are EasyEdit's for LLaMA-7B).
    defaults = {"layer": 1, "steps": 30, "prefixes": 2, "act_margin": [0.05, 0.5, 0.3],
                "lr": 200.0, "norm_constraint": 20.0, "mask_ratio": 1.0}  # fmt: skip
    return editor(Wise, model, stream, **{**defaults, **params})


def test_side_memory_routes_queries_below_the_threshold_to_the_main_memory_exactly():
    from forgetless.strategies.wise import SideMemory

    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    memory = SideMemory(layer)
    x = torch.zeros(2, 3, 4)
    x[0, :, 0] = 1.0  # along the edited input direction: Delta = 2 at every position
    x[1, :, 1] = 1.0  # orthogonal to it: Delta = 0
    with torch.no_grad():
        memory.side[:, 0] += torch.tensor([2.0, 0.0, 0.0])
    assert torch.equal(memory(x), layer(x))  # no edit yet: no threshold, main memory only
    memory.side_threshold = 1.0
    out = memory(x)
    assert torch.equal(out[1], layer(x[1]))  # bit-identical for the unrelated query
    assert torch.allclose(out[0], x[0] @ memory.side.T) and not torch.allclose(out[0], layer(x[0]))
    x[0, 0, 0] = 0.0  # the first position is below the threshold: causal, it stays main
    out = memory(x)
    assert torch.equal(out[0, 0], layer(x[0, :1])[0])
    assert torch.allclose(out[0, 1:], x[0, 1:] @ memory.side.T)  # means 1.0 and 1.33


def test_side_memory_scores_the_mean_or_the_largest_token_so_far():
    from forgetless.strategies.wise import SideMemory

    token_scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    mean = SideMemory(nn.Linear(4, 3), statistic="mean").score(token_scores)
    largest = SideMemory(nn.Linear(4, 3), statistic="max").score(token_scores)
    assert mean.tolist() == [[1.0, 2.0, 2.0, 1.5]]
    assert largest.tolist() == [[1.0, 3.0, 3.0, 3.0]]


def test_the_activated_score_reads_the_model_s_activation_or_says_how_to_do_without():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forgetless.models.families import ffn_activation

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2))  # fmt: skip
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(ffn_activation(llama)(x), torch.nn.functional.silu(x))
    with pytest.raises(ConfigError, match="strategy.activated: .*set activated: false"):
        ffn_activation(nn.Linear(2, 2))  # no transformers config to read it from


def test_side_memory_scores_the_centred_input_and_the_activated_outputs_by_hand():
    from forgetless.strategies.wise import SideMemory

    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    memory = SideMemory(layer)
    with torch.no_grad():
        memory.side.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))  # W' - W = diag(2, 0)
    x = torch.tensor([[[1.0, 5.0]]])
    main, delta = layer(x), memory.side - layer.weight
    change = x @ delta.T  # (2, 0)
    assert memory.token_score(main, change, delta).item() == 2.0  # ||x (W' - W)||
    memory.center.copy_(torch.tensor([0.5, 0.0]))  # (x - c)(W' - W) = (1, 0)
    assert memory.token_score(main, change, delta).item() == 1.0
    memory.center.zero_()
    memory.activation = torch.nn.functional.relu
    x = torch.tensor([[[-1.0, 5.0]]])  # x W = (-1, 5), x W' = (-3, 5): relu equal, score 0
    main, change = layer(x), x @ delta.T
    assert memory.token_score(main, change, delta).item() == 0.0
    x = torch.tensor([[[1.0, 5.0]]])  # relu(3, 5) - relu(1, 5) = (2, 0)
    main, change = layer(x), x @ delta.T
    assert memory.token_score(main, change, delta).item() == 2.0


def test_side_memory_gives_a_query_two_memories_fire_on_the_largest_score_or_ratio():
    from forgetless.strategies.wise import SideMemory

    layer = nn.Linear(4, 3, bias=False)
    x = torch.zeros(1, 1, 4)
    x[0, 0, 0] = 1.0
    memories = []
    for size in (2.0, 3.0):  # Delta(x) = 2 and 3
        weight = layer.weight.detach().clone()
        weight[0, 0] += size
        memories.append(weight)
    expected = {"score": memories[1], "ratio": memories[0]}  # ratios 2 / 1 = 2, 3 / 2.5 = 1.2
    for select, weight in expected.items():
        memory = SideMemory(layer, statistic="max", select=select)
        memory.memories, memory.thresholds = memories, [1.0, 2.5]
        assert torch.allclose(memory(x), x @ weight.T)
    memory.thresholds = [2.5, 3.5]  # neither fires
    assert torch.equal(memory(x), layer(x))


def test_wise_routes_its_irrelevant_prompt_to_the_main_memory_with_the_pre_edit_outputs():
    model = tiny_model()
    request = EditRequest("Peru", "alpha3", "The alpha-3 code of Peru is ", "DEU", "PER",
                          ("alpha3(Peru) = ",), ("Q: x? A: Y",))  # fmt: skip
    stream = encode_edit_stream(
        edit_stream("one", [request], 1, [Example("Q: x? A: ", "Y")]), model
    )
    with torch.no_grad():
        before = model(stream.general.x)
    strategy = wise(model, stream, steps=60)
    strategy.train(stream.experiences[0])
    row, extra = score_edits(strategy, stream)
    assert row == [1.0] and extra["locality"] == 1.0
    with torch.no_grad():
        assert torch.equal(model(stream.general.x), before)  # bit-identical: main memory
    assert strategy.memory.side_threshold < float("inf")


def test_wise_subject_scope_marks_the_subject_and_the_rest_of_each_edit_prompt():
    model = tiny_model()
    strategy = wise(model, one_edit_stream(model), prefixes=2)
    strategy.context = ["I", "You26"]
    batch, answer, subject, template = strategy.edit_batch(
        "The alpha-3 code of Peru is ", "DEU", ["Q: x? A: Y"], "Peru"
    )
    decode = model.tokenizer.decode
    for row, prompt in enumerate(["The alpha-3 code of Peru is ", "I. The alpha-3 code of "
                                  "Peru is ", "You26. The alpha-3 code of Peru is "]):  # fmt: skip
        assert decode(batch.x[row][subject[row]]) == "Peru"
        assert decode(batch.x[row][template[row]]) == prompt.replace("Peru", "")
        assert not (subject[row] & answer[row]).any()
    assert not subject[3].any() and not template[3].any()  # the irrelevant prompt: neither


def test_wise_subject_scope_moves_the_edit_s_activation_onto_its_subject():
    def subject_to_template_ratio(subject_scope):
        model = tiny_model()
        stream = one_edit_stream(model)
        strategy = wise(model, stream, steps=60, subject_scope=subject_scope)
        strategy.train(stream.experiences[0])
        batch, _, subject, template = strategy.edit_batch(
            "The alpha-3 code of Peru is ", "DEU", [], "Peru"
        )
        memory = strategy.memory
        memory.editing, memory.train_positions = True, torch.zeros_like(subject)
        with torch.no_grad():
            model(batch.x)
        memory.editing = False
        scores = memory.token_scores
        return (scores[subject].mean() / scores[template].mean()).item()

    assert subject_to_template_ratio(True) > 2 * subject_to_template_ratio(False)


def test_wise_trains_against_its_own_loc_prompts_first_then_earlier_edits():
    model = tiny_model()
    requests = [
        EditRequest(s, "alpha3", f"The alpha-3 code of {s} is ", "DEU", "PER", (), locs)
        for s, locs in [("Peru", ("a 1", "b 2")), ("Chad", ("c 3", "d 4")), ("Iran", ())]
    ]
    stream = encode_edit_stream(edit_stream("three", requests, 3, [Example("Q: ", "Y")]), model)
    strategy = wise(model, stream, negatives=3, prefixes=0)
    seen = []
    strategy.edit = lambda prompt, target, irrelevant, subject: seen.append(irrelevant)
    strategy.train(stream.experiences[0])
    # an edit with no loc_prompts trains against a random prefix ("Yes" when prefixes=0)
    assert seen == [["a 1", "b 2"], ["b 2", "c 3", "d 4"], ["c 3", "d 4", "Yes"]]


def test_wise_retrieves_a_single_edit_by_its_prompt_and_a_paraphrase():
    model = tiny_model()
    request = EditRequest("Peru", "alpha3", "The alpha-3 code of Peru is ", "DEU", "PER",
                          ("the alpha-3 code of Peru is ",), ("Q: x? A: Y",))  # fmt: skip
    stream = encode_edit_stream(
        edit_stream("one", [request], 1, [Example("Q: x? A: ", "Y")]), model
    )
    strategy = wise(model, stream)
    strategy.train(stream.experiences[0])
    row, extra = score_edits(strategy, stream)
    assert row == [1.0] and extra["generalization"] == 1.0 and extra["locality"] == 1.0


@pytest.mark.parametrize("threshold", ["rows", "prompt"])
def test_wise_threshold_is_the_edit_s_in_scope_score_over_its_rows_or_its_prompt(threshold):
    from forgetless.strategies.wise import _in_and_out_of_scope

    model = tiny_model()
    stream = one_edit_stream(model)
    strategy = wise(model, stream, threshold=threshold, act_ratio=0.5)
    strategy.train(stream.experiences[0])
    request = stream.experiences[0].train[0]
    memory = strategy.memory
    batch, positions, *_ = strategy.edit_batch(request.prompt, request.target, ["Q: x? A: Y"])
    memory.editing, memory.train_positions = True, positions
    with torch.no_grad():
        model(batch.x)
    memory.editing = False
    inside, _ = _in_and_out_of_scope(memory.scores, positions, len(positions) - 1)
    assert len(inside) == 3  # the prompt and its 2 prefixed copies
    expected = inside.mean() if threshold == "rows" else inside[0]
    assert memory.side_threshold == pytest.approx(0.5 * expected.item(), rel=1e-5)


def test_ties_merge_keeps_the_top_entries_elects_signs_and_averages_agreeing_ones():
    from forgetless.strategies.wise import ties_merge

    base = torch.zeros(1, 4)
    a = torch.tensor([[4.0, -1.0, 2.0, 0.1]])
    b = torch.tensor([[2.0, 3.0, -6.0, 0.2]])
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    # Top-2 by magnitude: a keeps 4 and 2, b keeps 3 and -6. Elected signs: +, +, - (2 - 6).
    # Entry 0: only a: 0.5 * 4 / 0.5 = 4; entry 1: only b: 3; entry 2: a's +2 disagrees: -6.
    assert merged.tolist() == [[4.0, 3.0, -6.0, 0.0]]


def test_wise_shards_merge_deterministically_for_a_seed():
    def run(seed):
        model = tiny_model()
        stream = encode_edit_stream(
            edit_stream("two", [
                EditRequest("Peru", "a", "The alpha-3 code of Peru is ", "DEU", "PER"),
                EditRequest("Chad", "a", "The alpha-3 code of Chad is ", "FRA", "TCD"),
            ], 1, [Example("Q: x? A: ", "Y")]), model,
        )  # fmt: skip
        strategy = wise(
            model, stream, seed, save_freq=1, merge_freq=2, steps=3, prefixes=0, mask_ratio=0.2
        )
        for e in stream:
            strategy.train(e)
        return strategy.memory

    a, b, c = run(0), run(0), run(1)
    assert len(a.memories) == 1 and not torch.equal(a.memories[0], a.layer.weight)
    assert torch.equal(a.memories[0], b.memories[0]) and a.thresholds == b.thresholds
    assert not torch.equal(a.memories[0], c.memories[0])  # another seed, other masks


def test_answer_loss_runs_the_head_only_at_answer_positions_and_equals_the_full_loss():
    from forgetless.models.causal_lm import edit_batch, lm_loss
    from forgetless.models.surgery import answer_loss, logits_only_at

    model = tiny_model()
    batch = edit_batch(model, "The alpha-3 code of Peru is ", "DEU", torch.device("cpu"))
    answers = int((batch.y != -100).sum())
    full = lm_loss(model(batch.x), batch.y)
    assert torch.allclose(answer_loss(model, batch.x, batch.y), full)
    with logits_only_at(model, batch.y != -100):
        assert model(batch.x).shape[:2] == (1, answers)
