"""Transformer families: where each Hugging Face causal LM keeps its blocks and matrices.

One row per family, read by every method that reaches into a block: FT-L, GRACE and WISE
edit one matrix of one block, HFT freezes half of each block's matrices, LoRA adapts the
projections it is told. A matrix is named by its role, the name Llama gives it
(`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`); the row
says where that matrix sits in a block of the family, as EasyEdit's hparams files do
(`inner_params`, `rewrite_module_tmp`): GPT-2's `down_proj` is `mlp.c_proj`, a Conv1D
whose weight is stored (in, out); its `q_proj`, `k_proj` and `v_proj` are all the one
fused `attn.c_attn`. A family whose FFN is not gated has no `gate_proj`.

`down_proj` is the FFN output matrix, the value matrix W_v of the WISE paper (sec. 2.3.1),
and the matrix the editors change by default. EasyEdit's FT-L hparams edit it in every
family (GPT-2 `c_proj`, GPT-J `fc_out`, Llama `down_proj`); its WISE and GRACE hparams
for GPT-2 wrap `c_fc` instead, which forgetless reaches as `module: up_proj`.

`model_type` (the checkpoint's config.json) picks the row. A family not listed is
refused, before any cell starts, by the methods that need a row (see `check_roles`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from forgetless.core.schema import ConfigError, suggest

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_ROLES = ROLES[:4]
FFN_ROLES = ROLES[4:]
FFN_OUTPUT = "down_proj"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Dotted path, from the transformers model, of the ModuleList of blocks."""
    roles: dict[str, str] = field(hash=False)
    """Role -> dotted path of its module within a block."""
    flat_ffn: bool = False
    """The block flattens (batch, tokens) into one axis before its FFN (OPT), so a module
    there cannot tell which sequence or position a token belongs to."""

    @property
    def attention(self) -> list[str]:
        """The block's distinct attention matrices (fused ones once), in role order."""
        return list(dict.fromkeys(self.roles[r] for r in ATTENTION_ROLES if r in self.roles))

    @property
    def ffn(self) -> list[str]:
        """The block's distinct feed-forward matrices, input side first."""
        return list(dict.fromkeys(self.roles[r] for r in FFN_ROLES if r in self.roles))


def _gated(prefix_attn: str = "self_attn", prefix_mlp: str = "mlp") -> dict[str, str]:
    """Llama's layout: separate q, k, v, o and a gated FFN (gate, up, down)."""
    return {**{r: f"{prefix_attn}.{r}" for r in ATTENTION_ROLES},
            **{r: f"{prefix_mlp}.{r}" for r in FFN_ROLES}}  # fmt: skip


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "model.layers", _gated()),
    Family("Mistral", ("mistral",), "model.layers", _gated()),
    Family("Qwen2", ("qwen2",), "model.layers", _gated()),
    Family("Qwen3", ("qwen3",), "model.layers", _gated()),
    Family("Gemma", ("gemma",), "model.layers", _gated()),
    Family("Gemma3", ("gemma3_text",), "model.layers", _gated()),
    Family("Phi-3", ("phi3",), "model.layers", {
        "q_proj": "self_attn.qkv_proj", "k_proj": "self_attn.qkv_proj",
        "v_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_up_proj", "up_proj": "mlp.gate_up_proj",
        "down_proj": "mlp.down_proj",
    }),
    Family("GPT-2", ("gpt2",), "transformer.h", {  # Conv1D: weights stored (in, out)
        "q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn",
        "o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj",
    }),
    Family("GPT-NeoX", ("gpt_neox",), "gpt_neox.layers", {  # Pythia
        "q_proj": "attention.query_key_value", "k_proj": "attention.query_key_value",
        "v_proj": "attention.query_key_value", "o_proj": "attention.dense",
        "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h",
    }),
    Family("OPT", ("opt",), "model.decoder.layers", {  # the FFN sits on the block itself
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.out_proj", "up_proj": "fc1", "down_proj": "fc2",
    }, flat_ffn=True),
    Family("GPT-J", ("gptj",), "transformer.h", {
        "q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
        "o_proj": "attn.out_proj", "up_proj": "mlp.fc_in", "down_proj": "mlp.fc_out",
    }),
)  # fmt: skip
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def known() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str | None) -> Family | None:
    return BY_MODEL_TYPE.get(model_type or "")


def transformers_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside `model` (a CausalLM, a peft wrapper, the model itself)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def family_of(model: nn.Module) -> tuple[Family | None, str | None]:
    """(the model's family or None, its model_type or None)."""
    inner = transformers_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    return family_for(model_type), model_type


def ffn_activation(model: nn.Module) -> nn.Module:
    """The model's FFN activation as its config names it (`hidden_act`, GPT-2's and GPT-J's
    `activation_function`), from transformers' ACT2FN."""
    from transformers.activations import ACT2FN

    config = getattr(transformers_model(model), "config", None)
    name = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if name is None:
        raise ConfigError(
            "strategy.activated: the model's config names no FFN activation (hidden_act or "
            "activation_function); set activated: false"
        )
    return ACT2FN[name]


def modules_with_parameters(model: nn.Module) -> str:
    """`name (Type)` of every module holding parameters of its own, for error messages."""
    has = sorted({f"{name.rsplit('.', 1)[-1]} ({type(m).__name__})"
                  for name, m in model.named_modules()
                  if name and next(m.parameters(recurse=False), None) is not None})  # fmt: skip
    return ", ".join(has) or "(none)"


def blocks(model: nn.Module, who: str) -> tuple[Family, list[nn.Module]]:
    """The model's family and its transformer blocks; a ConfigError says why there are none."""
    family, model_type = family_of(model)
    if family is None:
        what = f"model type {model_type!r}" if model_type else "a model that is no transformers LM"
        raise ConfigError(
            f"{who}: models/families.py names where each family keeps its blocks (Llama's "
            f"self_attn.q_proj ... mlp.down_proj) and has no row for {what}; known: {known()}. "
            f"Its modules with parameters are: {modules_with_parameters(model)}"
        )
    return family, list(transformers_model(model).get_submodule(family.blocks))


def block_matrix(
    model: nn.Module, layer: int, role: str, where: str, positions: bool = False
) -> nn.Module:
    """The module playing `role` (e.g. down_proj) in block `layer`: an nn.Linear, or a
    Conv1D on GPT-2 (see `in_out` and `project`). `positions`: the caller wraps it and reads
    its input per sequence and position, which a family with `flat_ffn` cannot give."""
    family, found = blocks(model, where)
    if not 0 <= layer < len(found):
        raise ConfigError(
            f"{where}: the model has no layer {layer}; it has layers 0-{len(found) - 1}"
        )
    if role not in family.roles:
        raise ConfigError(f"{where}: {missing_role(family, role)}")
    if positions and family.flat_ffn and role in FFN_ROLES:
        raise ConfigError(f"{where}: {flat_reason(family)}")
    return found[layer].get_submodule(family.roles[role])


def flat_reason(family: Family) -> str:
    return (
        f"{family.name} flattens a batch's sequences into one axis of tokens before its FFN, "
        "and this method reads the FFN's input per sequence and position (GRACE's keys at a "
        "token, WISE's routing over a sequence); use another family, or FT-L"
    )


def check_role_name(role: str, where: str) -> None:
    if role not in ROLES:
        raise ConfigError(
            f"{where}: {role!r} is not a matrix role{suggest(role, ROLES)}; roles are Llama's "
            f"names, translated per family by models/families.py: {', '.join(ROLES)}"
        )


def missing_role(family: Family, role: str) -> str:
    if role == "gate_proj":
        return f"{family.name}'s feed-forward is not gated: it has no gate_proj"
    return f"{role!r} is not a matrix role; roles: {', '.join(family.roles)}"


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def in_out(module: nn.Module) -> tuple[int, int]:
    """(input, output) width of a Linear or a Conv1D (whose weight is (in, out))."""
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)


def project(module: nn.Module, x, weight, bias=None):
    """x through `weight` laid out as `module`'s own (Linear: (out, in); Conv1D: (in, out))."""
    import torch.nn.functional as F

    if is_conv1d(module):
        out = x @ weight
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


# --- before any cell: which family a grid's model is ---------------------------------------
def check_roles(
    model_type: str | None, source: str, roles: Iterable[str], who: str, positions: bool = False
) -> None:
    """Refuse a method that needs `roles` on a model whose family does not have them: an
    unlisted family, a role it lacks (a gate on an FFN that is not gated), or, for a method
    that reads positions (`positions`), an FFN that sees none. Called by the grid validator,
    so the grid fails before any cell starts. `model_type` None means the type is not known
    before loading (the check then happens when the method is built)."""
    roles = [r for r in roles if r in ROLES]
    if not roles or model_type is None:
        return
    family = family_for(model_type)
    if family is None:
        raise ConfigError(
            f"{who}: it needs the model's {', '.join(roles)}, and models/families.py has no row "
            f"for model type {model_type!r} ({source}); known: {known()}. Add a row naming "
            "where the family keeps its blocks and matrices"
        )
    for role in roles:
        if role not in family.roles:
            raise ConfigError(f"{who}: on {source}, {missing_role(family, role)}")
        if positions and family.flat_ffn and role in FFN_ROLES:
            raise ConfigError(f"{who}: on {source}, {flat_reason(family)}")
