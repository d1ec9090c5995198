"""LoRA: learn tasks in low-rank adapters on frozen base weights, through peft.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022: a frozen weight W
gains a trainable update (alpha / r) B A, with B zero at the start so that a new adapter does
not change the model. `mode` says how adapters carry across tasks:

- shared: one adapter learns every task in turn (sequential LoRA fine-tuning, the usual
  baseline; q_proj and v_proj by default, as in SSR, Huang et al., ACL 2024).

Llama's matrix names (q_proj ... down_proj) name the same matrices in every family of
models/families.py: on GPT-2 q_proj and v_proj are its fused attn.c_attn (peft's own
default there), on GPT-NeoX attention.query_key_value. Other names are module names.
- per_task_merge: a fresh adapter per task, merged into the base weights after the task, so
  the model is a plain model again; the adapter of the next task is attached at once.
- per_task: a fresh adapter per task, kept: earlier adapters are frozen and stay active, so
  after task t the model runs W + sum over k <= t of (alpha / r) B_k A_k, and evaluation sees
  every adapter; memory grows by one adapter per task.

`memory_bytes` counts the adapter parameters held at the moment (never merged ones).
The paper adapts one model to one task; the three modes are the usual ways of carrying
adapters across a stream, and the adapters may train at their own `lr`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from forgetless.core.schema import ConfigError, param, positive, suggest
from forgetless.models.families import ROLES, family_of, missing_role
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Experience


@dataclass
class LoRAConfig:
    r: int = param(8, "rank of each adapter")
    alpha: float = param(16, "scale numerator: the update is (alpha / r) B A")
    dropout: float = param(0.0, "dropout on the adapter's input while training")
    target_modules: list[str] = param(
        ["q_proj", "v_proj"],
        "modules to adapt: Llama's matrix names (the family's own, models/families.py), or "
        "module names (a name matches its last parts)",
    )
    mode: Literal["shared", "per_task_merge", "per_task"] = param(
        "shared",
        "shared: one adapter for all tasks; per_task_merge: a fresh adapter per task, merged "
        "after it; per_task: a fresh adapter per task, kept frozen and active",
    )
    lr: float | None = param(
        None,
        "the adapters' learning rate (default: train.lr); adapters are usually trained at "
        "several times full fine-tuning's rate",
    )

    def validate(self, where: str) -> None:
        positive(self.r, f"{where}.r")
        positive(self.lr, f"{where}.lr")
        positive(self.alpha, f"{where}.alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{where}.target_modules: list at least one module, e.g. [q_proj]")


def target_modules(model: nn.Module, targets: list[str], where: str) -> list[str]:
    """peft's target names: Llama's matrix names translated into the model's family (fused
    matrices once), other names as written."""
    family, _ = family_of(model)
    if family is None:
        return list(targets)
    out = []
    for target in targets:
        if target in ROLES and target not in family.roles:
            raise ConfigError(f"{where}: {missing_role(family, target)}")
        out.append(family.roles.get(target, target))
    return list(dict.fromkeys(out))


def check_target_modules(model: nn.Module, targets: list[str], where: str) -> None:
    """Refuse a target that names no module of `model` (peft matches a name's last parts)."""
    names = [name for name, _ in model.named_modules()]
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear)})  # fmt: skip
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(
                f"{where}: the model has no module {target!r}{suggest(target, linear)}; "
                f"its Linear modules are: {', '.join(linear)}"
            )


@register_strategy("lora")
class LoRA(Strategy):
    Config = LoRAConfig
    supports = ("generation",)

    @staticmethod
    def model_roles(config: LoRAConfig) -> tuple[str, ...]:
        return tuple(config.target_modules)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        where = "strategy.target_modules"
        self.targets = target_modules(self.model.model, self.config.target_modules, where)
        check_target_modules(self.model.model, self.targets, where)
        if self.config.lr is not None:  # warm-up reads train_config.lr too
            self.train_config = dataclasses.replace(self.train_config, lr=self.config.lr)
        self.adapters: list[str] = []
        self.trained = 0  # experiences trained so far
        self._add_adapter("shared" if self.config.mode == "shared" else "task_0")

    def before_experience(self, experience: Experience) -> None:
        super().before_experience(experience)
        if self.config.mode == "per_task" and len(self.adapters) == self.trained:
            self._add_adapter(f"task_{self.trained}")  # the newest adapter is trained: add one

    def after_experience(self, experience: Experience) -> None:
        super().after_experience(experience)
        self.trained += 1
        if self.config.mode == "per_task_merge":
            self.model.model = self.model.model.merge_and_unload()
            self.adapters = []
            self._add_adapter(f"task_{self.trained}")

    def _add_adapter(self, name: str) -> None:
        """Attach a fresh adapter; all adapters stay active, only the newest one trains.

        The CausalLM wrapper (tokenizer, encode) stays; its inner transformers model is what
        peft wraps, so evaluation runs the adapters."""
        import peft

        config = peft.LoraConfig(
            r=self.config.r,
            lora_alpha=self.config.alpha,
            lora_dropout=self.config.dropout,
            target_modules=list(self.targets),
            task_type="CAUSAL_LM",
        )
        inner = self.model.model
        if isinstance(inner, peft.PeftModel):
            inner.add_adapter(name, config)
        else:
            inner = self.model.model = peft.get_peft_model(inner, config, adapter_name=name)
        self.adapters.append(name)
        inner.base_model.set_adapter(self.adapters)  # all active and trainable ...
        if len(self.adapters) > 1:
            inner.set_requires_grad(self.adapters[:-1], requires_grad=False)  # ... but the newest
        self.optimizer = self.make_optimizer()

    def adapter_parameters(self) -> list[nn.Parameter]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        return [p for m in layers for name in m.adapter_layer_names
                for p in getattr(m, name).parameters()]  # fmt: skip

    def memory_bytes(self) -> int:
        adapters = sum(p.numel() * p.element_size() for p in self.adapter_parameters())
        return super().memory_bytes() + adapters

    def state_dict(self) -> dict:
        lora = {"adapters": list(self.adapters), "trained": self.trained}
        return {**super().state_dict(), "lora": lora}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the saved adapters on the bare model, then load weights and optimizer."""
        self.model.model = self.model.model.unload()
        self.adapters = []
        for name in state["lora"]["adapters"]:
            self._add_adapter(name)
        self.trained = state["lora"]["trained"]
        super().load_state_dict(state)
