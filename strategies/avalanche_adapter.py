"""`avalanche.<Name>`: any avalanche-lib strategy (Naive, Replay, EWC, LwF, SI, GEM, AGEM,
GDumb, ...) trained on a forgetless stream, scored and logged by forgetless.

The strategy's own parameters are read from its constructor signature, so the grid
is validated against avalanche-lib's declaration; training settings (batch size,
epochs, optimizer) come from the grid's `train:` section. The stream is converted
once into an avalanche benchmark so that strategies keyed on the experience index
(GEM, EWC's separate mode) see the same indices as forgetless.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from collections.abc import Iterator
from typing import Any, Optional, Union, get_args, get_origin

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from forgetless.core.schema import ConfigError, suggest
from forgetless.strategies.base import NonFiniteLoss, Strategy, TrainConfig
from forgetless.streams import Experience, Stream

# Set from the grid's `train:` section or by forgetless itself, never by strategy parameters.
RESERVED = {
    "model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size",
    "device", "plugins", "evaluator", "eval_every", "base_kwargs",
}  # fmt: skip


class AvalancheStrategy(Strategy):
    """Runs `avalanche_class` through forgetless; subclasses are made per name below."""

    avalanche_class: type
    # Plugin state (EWC importances, LwF's old model, GEM memories) is held in
    # avalanche objects that only its dill-pickle checkpoints save; a retried cell restarts.
    resumable = False

    def __init__(self, model: nn.Module, config: Any, train: TrainConfig, stream: Stream) -> None:
        super().__init__(model, config, train, stream)
        from avalanche.benchmarks.scenarios import benchmark_from_datasets
        from avalanche.benchmarks.scenarios.task_aware import with_task_labels
        from avalanche.training.plugins import EvaluationPlugin, SynapticIntelligencePlugin

        self.benchmark = benchmark_from_datasets(
            train=[_as_avalanche(e.train) for e in stream],
            test=[_as_avalanche(e.test) for e in stream],
        )
        if any(e.train.task is not None for e in stream):
            # Avalanche hands a multi-task model its task labels only from experiences that
            # say they have them; without this, every head trains under one softmax.
            self.benchmark = with_task_labels(self.benchmark)
        self.inner = self.avalanche_class(
            model=model,
            optimizer=self.optimizer,
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=train.batch_size,
            train_epochs=train.epochs,
            eval_mb_size=train.eval_batch_size,
            device=self.device,
            evaluator=EvaluationPlugin(loggers=[]),
            **dataclasses.asdict(config),
        )
        for plugin in self.inner.plugins:
            if type(plugin) is SynapticIntelligencePlugin:
                plugin.__class__ = _synaptic_intelligence_that_copies()

    def train(self, experience: Experience) -> None:
        self.inner.train(self.benchmark.train_stream[experience.index], num_workers=0)
        # Some strategies replace the model (GDumb retrains a fresh copy): score theirs.
        self.model = self.inner.model
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(
                f"avalanche {self.avalanche_class.__name__} produced non-finite weights on "
                f"{experience.name!r}; lower train.lr"
            )

    def memory_bytes(self) -> float:
        """Bytes the avalanche strategy holds beyond the model, or NaN where it cannot tell.

        Counted: every tensor its plugins hold (EWC's importances and saved parameters,
        SI's, GEM's memories and constraint matrix G, AGEM's reference gradients,
        reservoir weights), every module they keep besides the model (LwF's previous
        model, GDumb's initial one), and every buffered sample (replay buffers and
        per-experience datasets) at the size of what its dataset returns: the input at its
        dtype, 8 bytes (int64) for each integer field (target, task label), DER's logits.
        A strategy class keeping state on itself is counted only where `OWN_STATE` names
        that state; anything the walk does not know how to measure makes the answer NaN,
        never a guessed 0.
        """
        name, module = self.avalanche_class.__name__, self.avalanche_class.__module__
        own = OWN_STATE.get(name, () if module in PLUGIN_WRAPPERS else None)
        if own is None:
            return float("nan")
        seen = {id(self.inner), id(self.inner.evaluator), id(self.model)}
        # The model's weights and gradients, which every strategy holds: plugins keep views
        # of them (SI's new_theta and grad on CPU), which cost nothing more.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        model_storage = {t.data_ptr() for t in [*self.model.state_dict().values(), *grads]}
        held = [p for p in self.inner.plugins if p is not self.inner.evaluator]
        held += [getattr(self.inner, name) for name in own]
        return float(_held_bytes(held, seen, model_storage))


# Avalanche-lib 0.6.0 strategy classes that keep memory on the strategy object rather than
# in plugins: the attributes that hold it (None: not counted, so reported as unknown).
OWN_STATE: dict[str, tuple[str, ...] | None] = {
    "Cumulative": ("dataset",),
    "DER": ("storage_policy",),
    "ER_ACE": ("storage_policy",),
    "ER_AML": ("storage_policy",),
    "GenerativeReplay": None,  # a whole generator strategy beside the model
}
# Modules whose strategies are a template plus plugins, keeping nothing of their own.
PLUGIN_WRAPPERS = {
    "avalanche.training.supervised.strategy_wrappers",
    "avalanche.training.supervised.strategy_wrappers_online",
}
_NO_DATA = (type(None), bool, int, float, complex, str, torch.device, torch.dtype, torch.Size)


@functools.cache
def _synaptic_intelligence_that_copies() -> type:
    """avalanche-lib's SI plugin with the weights it records copied, not viewed.

    avalanche-lib 0.6.0 records weights as `param.detach().cpu().flatten()`. On a GPU that is
    a copy; on the CPU it is a view of the live parameter, so the anchor of the penalty and
    the weights before each step move with the model: the path integral and the penalty
    stay 0, and SI trains as naive. This class (swapped onto the plugin SynapticIntelligence
    makes, its state kept) copies the two that must not move, on every device.
    """
    from avalanche.training.plugins import SynapticIntelligencePlugin

    def own(params: dict) -> None:
        for param in params.values():
            param.data = param.data.clone()

    class SynapticIntelligenceThatCopies(SynapticIntelligencePlugin):
        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_exp(strategy, **kwargs)
            own(self.ewc_data[0])  # the weights the penalty pulls towards

        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_iteration(strategy, **kwargs)
            own(self.syn_data["old_theta"])  # the weights before this step

    return SynapticIntelligenceThatCopies


def _as_avalanche(samples):
    # avalanche-lib 0.6 exposes tensor datasets only under this name.
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    task = samples.task if samples.task is not None else torch.zeros_like(samples.y)
    return _make_taskaware_tensor_classification_dataset(
        samples.x, samples.y, targets=samples.y.tolist(), task_labels=task.tolist()
    )


def _held_bytes(obj: Any, seen: set[int], counted: set[int], depth: int = 0) -> float:
    """Bytes of the tensors, modules and datasets reachable from `obj`, each counted once
    (tensors by storage address, so the model's own, in `counted`, are not)."""
    from avalanche.benchmarks.utils import AvalancheDataset

    if isinstance(obj, _NO_DATA) or id(obj) in seen:
        return 0
    if depth > 12:
        return float("nan")
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in counted:
            return 0
        counted.add(obj.data_ptr())
        return obj.element_size() * obj.nelement()
    if isinstance(obj, nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
        return sum(_held_bytes(t, seen, counted, depth + 1) for t in tensors)
    if isinstance(obj, AvalancheDataset):
        return len(obj) * _sample_bytes(obj[0]) if len(obj) else 0
    if isinstance(obj, dict):
        return sum(_held_bytes(v, seen, counted, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(_held_bytes(v, seen, counted, depth + 1) for v in obj)
    if isinstance(obj, (DataLoader, Iterator, enum.Enum, type)) or inspect.isroutine(obj):
        return 0  # loaders and iterators read data counted where it is held; code; names
    avalanche_made = any(c.__module__.startswith("avalanche") for c in type(obj).__mro__)
    if avalanche_made and hasattr(obj, "__dict__"):  # storage policies, ParamData, plugins
        return _held_bytes(vars(obj), seen, counted, depth + 1)
    return float("nan")  # something the walk cannot measure: unknown, never 0


def _sample_bytes(sample: Any) -> float:
    """One buffered sample: its tensors at their dtype, 8 bytes per integer or float field."""
    fields = sample if isinstance(sample, (list, tuple)) else [sample]
    total = 0.0
    for value in fields:
        if isinstance(value, torch.Tensor):
            total += value.element_size() * value.nelement()
        elif isinstance(value, (bool, int, float)):
            total += 8
        else:
            return float("nan")
    return total


@functools.cache
def avalanche_strategy(name: str, where: str = "strategy") -> type[Strategy]:
    """A forgetless Strategy class wrapping `avalanche.training.<name>`."""
    import avalanche.training

    cls = getattr(avalanche.training, name, None)
    if not (inspect.isclass(cls) and hasattr(cls, "train") and hasattr(cls, "eval")):
        known = [
            n
            for n, c in vars(avalanche.training).items()
            if inspect.isclass(c) and hasattr(c, "train") and hasattr(c, "eval") and n[0].isupper()
        ]
        raise ConfigError(
            f"{where}: avalanche-lib has no strategy {name!r}{suggest(name, known)}; "
            f"known: {', '.join(sorted(known))}"
        )
    fields = []
    for p in inspect.signature(cls).parameters.values():
        if p.name in RESERVED or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        hint = _simple_type(p.annotation, p.default)
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, hint))
        else:
            fields.append((p.name, hint, dataclasses.field(default=p.default)))
    fields.sort(key=len)  # required fields first, as dataclasses want
    config = dataclasses.make_dataclass(f"Avalanche{name}Config", fields)
    config.__doc__ = f"Parameters of avalanche.training.{name}, read from its signature."
    return type(
        f"Avalanche{name}",
        (AvalancheStrategy,),
        {"Config": config, "avalanche_class": cls, "__doc__": inspect.getdoc(cls)},
    )


def _simple_type(annotation: Any, default: Any) -> Any:
    """int/float/str/bool (optionally None) where avalanche-lib says so; Any otherwise."""
    simple = (bool, int, float, str)
    if annotation in simple:
        return annotation
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in simple:
            return Optional[args[0]]  # noqa: UP045 - a runtime type object
        if float in args:  # e.g. Union[float, Sequence[float]]: one value per experience
            return Any
    if annotation is inspect.Parameter.empty and isinstance(default, simple):
        return type(default)
    return Any
