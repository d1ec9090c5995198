"""Every causal LM family of models/families.py: a tiny random checkpoint of each, saved as
users save theirs, runs one short cell of every language-model strategy through the
runner (`model: {name: "hf:<folder>"}`); a strategy that cannot work on a family is refused
with its reason before any cell starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as T
from shared_data import SHARED_DATA
from torch import nn

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import build_cell, run_grid
from forgetless.models.causal_lm import bpe_tokenizer
from forgetless.models.families import (
    FAMILIES,
    ROLES,
    block_matrix,
    family_of,
    in_out,
    is_conv1d,
    project,
    transformers_model,
)
from forgetless.strategies.hft import transformer_blocks
from forgetless.strategies.lora import target_modules

ZSRE = SHARED_DATA / "zsre" / "zsre_mend_train.sample.json"
WIDTH, FFN, LAYERS, CONTEXT = 16, 32, 2, 256
SPECIAL = {"vocab_size": 300, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
LLAMA_LIKE = {"hidden_size": WIDTH, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
              "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": CONTEXT}  # fmt: skip
CONFIGS = {  # model_type -> a tiny config of the family
    "llama": lambda: T.LlamaConfig(**LLAMA_LIKE, **SPECIAL),
    "mistral": lambda: T.MistralConfig(**LLAMA_LIKE, **SPECIAL),
    "qwen2": lambda: T.Qwen2Config(**LLAMA_LIKE, **SPECIAL),
    "qwen3": lambda: T.Qwen3Config(**LLAMA_LIKE, head_dim=8, **SPECIAL),
    "gemma": lambda: T.GemmaConfig(**LLAMA_LIKE, head_dim=8, **SPECIAL),
    "gemma3_text": lambda: T.Gemma3TextConfig(**LLAMA_LIKE, head_dim=8, **SPECIAL),
    "phi3": lambda: T.Phi3Config(**LLAMA_LIKE, **SPECIAL),
    "gpt2": lambda: T.GPT2Config(
        n_embd=WIDTH, n_layer=LAYERS, n_head=2, n_positions=CONTEXT, **SPECIAL
    ),  # fmt: skip
    "gpt_neox": lambda: T.GPTNeoXConfig(
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=CONTEXT,
        **SPECIAL,
    ),  # fmt: skip
    "opt": lambda: T.OPTConfig(
        hidden_size=WIDTH,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        word_embed_proj_dim=WIDTH,
        max_position_embeddings=CONTEXT,
        **SPECIAL,
    ),  # fmt: skip
    "gptj": lambda: T.GPTJConfig(
        n_embd=WIDTH, n_layer=LAYERS, n_head=2, rotary_dim=4, n_positions=CONTEXT, **SPECIAL
    ),  # fmt: skip
    # Not in the table: what a family without a row gets.
    "bloom": lambda: T.BloomConfig(hidden_size=WIDTH, n_layer=LAYERS, n_head=2, **SPECIAL),
}
# The matrix runs in full under `integration`; these by default: the Llama layout, GPT-2's
# Conv1D with fused q/k/v, and OPT, whose FFN sees no sequences.
QUICK = {"llama", "gpt2", "opt"}
GENERATION = {"name": "instructions", "tasks": ["uppercase", "reverse"], "train_size": 8,
              "test_size": 4, "base": None}  # fmt: skip
EDITS = {"name": "zsre", "path": str(ZSRE), "edits": 2}
STRATEGIES = {
    GENERATION["name"]: [
        "naive", {"name": "rehearsal", "buffer": {"size": 4}}, {"name": "lora", "r": 2}, "hft",
        {"name": "ssr", "synthesis": "sample", "instances_per_task": 2, "candidates_per_task": 4},
    ],
    EDITS["name"]: [
        {"name": "ft_l", "layer": 1, "steps": 2}, {"name": "grace", "layer": 1, "steps": 2},
        {"name": "wise", "layer": 1, "steps": 2, "prefixes": 1},
        {"name": "larimar", "slots": 8, "steps": 2, "key_steps": 2, "batch_size": 4,
         "answer_tokens": 24, "corpus": str(ZSRE)},
    ],
}  # fmt: skip
# (model_type, strategy) -> why the grid is refused
REFUSED = {
    ("opt", "grace"): "OPT flattens a batch's sequences into one axis of tokens before its FFN",
    ("opt", "wise"): "OPT flattens a batch's sequences into one axis of tokens before its FFN",
}


pytestmark = pytest.mark.usefixtures("offline", "shared_cache", "one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """model_type -> a folder with a tiny random checkpoint and a byte-level BPE tokenizer
    (tokenizer.json), saved with save_pretrained as a user's model is."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = bpe_tokenizer(["What is the product made by UniFirst? unmanned aircraft"], 300)
    folders = {}
    for model_type, config in CONFIGS.items():
        torch.manual_seed(0)
        folder = root / model_type
        T.AutoModelForCausalLM.from_config(config()).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[model_type] = folder
    return folders


def load(folder: Path) -> nn.Module:
    return T.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


# --- the table -----------------------------------------------------------------------------


def test_every_family_of_the_table_has_a_tiny_checkpoint_here():
    assert {t for f in FAMILIES for t in f.model_types} == set(CONFIGS) - {"bloom"}
    assert len(FAMILIES) == 11


@pytest.mark.parametrize("model_type", sorted(set(CONFIGS) - {"bloom"}))
def test_each_role_of_a_family_is_a_matrix_of_every_block(checkpoints, model_type):
    model = load(checkpoints[model_type])
    family, found_type = family_of(model)
    assert found_type == model_type and model_type in family.model_types
    for layer in range(LAYERS):
        for role in family.roles:
            module = block_matrix(model, layer, role, "where")
            assert isinstance(module, nn.Linear) or is_conv1d(module)
        down = block_matrix(model, layer, "down_proj", "where")
        assert in_out(down) == (4 * WIDTH if model_type in ("gpt2", "gptj") else FFN, WIDTH)
    blocks, attention = transformer_blocks(model)
    assert len(blocks) == LAYERS and 2 <= attention <= 4 and 2 <= len(blocks[0]) - attention <= 3
    expected_gated = model_type not in ("gpt2", "gpt_neox", "opt", "gptj")
    assert ("gate_proj" in family.roles) is expected_gated
    assert set(family.roles) <= set(ROLES)


def test_gpt2_names_its_conv1d_c_proj_as_the_ffn_output_and_c_attn_for_q_k_v(checkpoints):
    model = load(checkpoints["gpt2"])
    down = block_matrix(model, 1, "down_proj", "where")
    assert down is model.transformer.h[1].mlp.c_proj and is_conv1d(down)
    assert in_out(down) == (4 * WIDTH, WIDTH) and down.weight.shape == (4 * WIDTH, WIDTH)
    assert target_modules(model, ["q_proj", "v_proj"], "where") == ["attn.c_attn"]
    assert target_modules(model, ["q_proj", "c_fc"], "where") == ["attn.c_attn", "c_fc"]
    with pytest.raises(ConfigError, match="GPT-2's feed-forward is not gated"):
        target_modules(model, ["gate_proj"], "where")


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_project_applies_a_weight_in_the_module_s_own_layout(checkpoints, model_type):
    down = block_matrix(load(checkpoints[model_type]), 0, "down_proj", "where")
    x = torch.randn(2, 3, in_out(down)[0])
    with torch.no_grad():
        torch.testing.assert_close(project(down, x, down.weight, down.bias), down(x))
        doubled = project(down, x, 2 * down.weight)
        torch.testing.assert_close(doubled, 2 * project(down, x, down.weight))


# --- one cell of every strategy on every family --------------------------------------------


def grid(folder: Path, stream: dict, strategies: list, storage: Path):
    return grid_from_dict({
        "name": f"families-{folder.name}-{stream['name']}", "streams": [stream],
        "strategies": strategies, "model": {"name": f"hf:{folder}", "context": CONTEXT},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.01}, "storage": str(storage),
    })  # fmt: skip


def strategy_name(spec) -> str:
    return spec if isinstance(spec, str) else spec["name"]


@pytest.mark.parametrize(
    "model_type",
    [
        m if m in QUICK else pytest.param(m, marks=pytest.mark.integration)
        for m in sorted(set(CONFIGS) - {"bloom"})
    ],  # fmt: skip
)
def test_every_language_model_strategy_runs_a_cell_on_the_family_or_is_refused_with_why(
    checkpoints, model_type, tracking_uri, tmp_path
):
    folder = checkpoints[model_type]
    for stream, strategies in ((GENERATION, STRATEGIES["instructions"]),
                               (EDITS, STRATEGIES["zsre"])):  # fmt: skip
        runnable = []
        for spec in strategies:
            reason = REFUSED.get((model_type, strategy_name(spec)))
            if reason:
                with pytest.raises(ConfigError, match=re.escape(reason)):
                    grid(folder, stream, [spec], tmp_path)
            else:
                runnable.append(spec)
        outcomes = run_grid(grid(folder, stream, runnable, tmp_path / "runs"), tracking_uri)
        finished = {o.label.split("/")[1].split(" ")[0]: o.status for o in outcomes}
        assert finished == {strategy_name(s): "FINISHED" for s in runnable}, [
            o.error for o in outcomes if o.error
        ]


def test_editors_edit_or_wrap_gpt2_s_conv1d_c_proj(checkpoints, tmp_path):
    """FT-L, GRACE and WISE refused GPT-2 before the table ("no mlp.down_proj Linear")."""
    reference = dict(load(checkpoints["gpt2"]).named_parameters())
    for cell in grid(checkpoints["gpt2"], EDITS, STRATEGIES["zsre"][:3], tmp_path).cells:
        stream, strategy = build_cell(cell, "cpu")
        strategy.train(stream.experiences[0])
        inner = strategy.model.model
        changed = [n for n, p in inner.named_parameters()
                   if n in reference and not torch.equal(p, reference[n])]  # fmt: skip
        if cell.strategy == "ft_l":  # the Conv1D itself learns, alone
            assert changed == ["transformer.h.1.mlp.c_proj.weight"]
        else:  # wrapped and left as it was; the codebook or the side memory learns
            wrapper = inner.transformer.h[1].mlp.c_proj
            original = reference["transformer.h.1.mlp.c_proj.weight"]
            assert is_conv1d(wrapper.layer) and torch.equal(wrapper.layer.weight, original)
            assert changed == []


# --- refusals before any cell ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"name": "ft_l", "layer": 1}, "no row for model type 'bloom'"),
        ("hft", "no row for model type 'bloom'"),
        ({"name": "lora", "target_modules": ["q_proj"]}, "no row for model type 'bloom'"),
    ],
)
def test_a_family_without_a_row_is_refused_by_methods_that_reach_into_its_blocks(
    checkpoints, strategy, message, tmp_path
):
    stream = EDITS if strategy_name(strategy) == "ft_l" else GENERATION
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        grid(checkpoints["bloom"], stream, [strategy], tmp_path)
    assert "models/families.py" in str(error.value) and "Llama (llama)" in str(error.value)


def test_a_family_without_a_row_still_runs_methods_that_need_none(checkpoints, tmp_path):
    folder = checkpoints["bloom"]
    lora = {"name": "lora", "r": 2, "target_modules": ["query_key_value"]}  # by module name
    for spec in ["naive", lora]:
        stream, strategy = build_cell(grid(folder, GENERATION, [spec], tmp_path).cells[0], "cpu")
        strategy.train(stream.experiences[0])


def test_a_gate_on_a_family_whose_ffn_is_not_gated_is_refused(checkpoints, tmp_path):
    lora = {"name": "lora", "target_modules": ["gate_proj"]}
    with pytest.raises(ConfigError, match=r"strategies\[0\] \(lora\): .*GPT-J's feed-forward"):
        grid(checkpoints["gptj"], GENERATION, [lora], tmp_path)


def test_a_hub_id_offline_is_refused_naming_hf_hub_offline_and_a_local_folder(tmp_path):
    with pytest.raises(ConfigError) as error:
        grid(Path("HuggingFaceTB/SmolLM2-135M-Instruct"), GENERATION, ["naive"], tmp_path)
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "--local-dir" in message and "hf:DIR" in message


def test_docs_models_lists_every_family_as_the_table_has_it():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    rows = {}
    for line in docs.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1] in {t for f in FAMILIES for t in f.model_types}:
            rows[cells[0]] = cells
    for family in FAMILIES:
        r = family.roles
        q_k_v = ", ".join(dict.fromkeys(r[x] for x in ("q_proj", "k_proj", "v_proj")))
        assert rows[family.name] == [
            family.name, "`, `".join(family.model_types), family.blocks,
            q_k_v, r["o_proj"], r.get("gate_proj", "(none)"),
            r["up_proj"], r["down_proj"],
        ]  # fmt: skip


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma3_text"])
def test_replaying_the_blocks_below_an_edited_layer_gives_the_whole_pass_s_logits(
    checkpoints, model_type
):
    from forgetless.models.surgery import reuse_blocks_below

    model = load(checkpoints[model_type])
    x = torch.randint(3, 300, (2, 7))
    down = block_matrix(model, 1, "down_proj", "where")
    with torch.no_grad():
        whole = model(x).logits
        with reuse_blocks_below(model, 1):
            first = model(x).logits
            down.weight.mul_(2)  # the edited block's change shows in a replayed pass
            replayed = model(x).logits
        assert [type(b).__name__ for b in transformers_model(model).get_submodule(
            family_of(model)[0].blocks)][0] != "_Passthrough"  # fmt: skip
        changed = model(x).logits
    assert torch.equal(first, whole) and torch.equal(replayed, changed)
    assert not torch.equal(changed, whole)
