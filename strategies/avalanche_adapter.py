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
import functools
import inspect
from typing import Any, Optional, Union, get_args, get_origin

import torch
from torch import nn

from forgetless.experiments.schema import ConfigError, suggest
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
        from avalanche.training.plugins import EvaluationPlugin

        self.benchmark = benchmark_from_datasets(
            train=[_as_avalanche(e.train) for e in stream],
            test=[_as_avalanche(e.test) for e in stream],
        )
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

    def train(self, experience: Experience) -> None:
        self.inner.train(self.benchmark.train_stream[experience.index], num_workers=0)
        # Some strategies replace the model (GDumb retrains a fresh copy): score theirs.
        self.model = self.inner.model
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(
                f"avalanche {self.avalanche_class.__name__} produced non-finite weights on "
                f"{experience.name!r}; lower train.lr"
            )

    def memory_bytes(self) -> int:
        """Tensors the strategy and its plugins hold beyond the model, and replay buffers."""
        seen: set[int] = {id(p) for p in self.model.parameters()}
        total = 0
        for plugin in self.inner.plugins:
            total += _tensor_bytes(vars(plugin), seen)
            storage = getattr(plugin, "storage_policy", None)
            if storage is not None and len(self.benchmark.train_stream) > 0:
                total += len(storage.buffer) * _sample_bytes(self.benchmark)
        return total


def _as_avalanche(samples):
    # avalanche-lib 0.6 exposes tensor datasets only under this name.
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    task = samples.task if samples.task is not None else torch.zeros_like(samples.y)
    return _make_taskaware_tensor_classification_dataset(
        samples.x, samples.y, targets=samples.y.tolist(), task_labels=task.tolist()
    )


def _sample_bytes(benchmark) -> int:
    x, y, *_ = benchmark.train_stream[0].dataset[0]
    return x.element_size() * x.nelement() + 8


def _tensor_bytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    if depth > 8 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, nn.Module):
        return sum(_tensor_bytes(t, seen, depth + 1) for t in obj.state_dict().values())
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen, depth + 1) for v in obj)
    if type(obj).__module__.startswith("avalanche"):  # ParamData, LwF's helper, ...
        return _tensor_bytes(vars(obj), seen, depth + 1) if hasattr(obj, "__dict__") else 0
    return 0


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
