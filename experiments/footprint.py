"""What a cell holds on its device before the first batch: parameters, and the bytes of
its weights, gradients and optimizer state, so that `forgetless validate` can refuse a
`resources.gpu` share that cannot hold them before anything starts.

Nothing is loaded or allocated: an `hf:` model is built from its config (AutoConfig,
offline for a folder) on the meta device, a GGUF checkpoint is counted from its tensor
shapes, and any other model is built by its factory on the meta device. The estimate
assumes every parameter trains (full fine-tuning: an upper bound for LoRA and HFT) and
leaves out activations, which depend on batch size and sequence length: mixed precision
(`train.precision`) saves activation memory and keeps float32 weights, so only
`model.dtype` changes these figures.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from forgetless.core.schema import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GPU_MEMORY_ENV = "FORGETLESS_GPU_MEMORY_GB"
DEFAULT_GPU_MEMORY_GB = 80.0  # an A100 or H100 80 GB, the usual card for 7B models
GIB = 2**30


@dataclass
class Footprint:
    parameters: int
    weights: int  # bytes
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def describe(self) -> str:
        def gib(n: int) -> str:
            for unit, size in (("GiB", GIB), ("MiB", 2**20)):
                if n >= size:
                    return f"{n / size:.3g} {unit}"
            return f"{n / 2**10:.3g} KiB"

        return (
            f"{_count(self.parameters)} params; weights {gib(self.weights)} + gradients "
            f"{gib(self.gradients)} + optimizer {gib(self.optimizer)} = {gib(self.total)}"
        )


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def cell_footprint(config: dict) -> Footprint:
    """The footprint of a resolved cell config (`cell.config`)."""
    model, train = config["model"], config["train"]
    parameters = parameter_count(json.dumps(model, sort_keys=True),
                                 json.dumps(config["stream"], sort_keys=True))  # fmt: skip
    width = DTYPE_BYTES[model.get("dtype", "float32")]
    if train["optimizer"] in ("adam", "adamw"):
        states = 2  # first and second moments, in the parameters' dtype
    else:
        states = 1 if train.get("momentum", 0) > 0 else 0
    return Footprint(parameters, parameters * width, parameters * width,
                     states * parameters * width)  # fmt: skip


@cache
def parameter_count(model_json: str, stream_json: str) -> int:
    """Parameters of the model a cell builds (keyed by JSON, so each distinct model and
    stream is counted once per grid)."""
    model = json.loads(model_json)
    name = model["name"]
    if name.startswith("hf:"):
        return _hf_parameters(name[len("hf:") :])
    if name.startswith("gguf:"):
        return _gguf_parameters(name[len("gguf:") :])
    from forgetless.experiments.config import build_params
    from forgetless.models import build_model, model_factory
    from forgetless.streams import build_stream, stream_factory

    stream_spec = json.loads(stream_json)
    stream_config = typing.get_type_hints(stream_factory(stream_spec["name"], "stream"))["config"]
    stream = build_stream(
        stream_spec["name"], build_params(stream_config, stream_spec, "stream"), 0
    )
    model_config = typing.get_type_hints(model_factory(name, "model"))["config"]
    with torch.device("meta"):
        built = build_model(name, build_params(model_config, model, "model"), stream)
    return sum(p.numel() for p in built.parameters())


def _hf_parameters(spec: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgetless.models.causal_lm import hf_source

    source = hf_source(spec)
    config = AutoConfig.from_pretrained(source, local_files_only=isinstance(source, Path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _gguf_parameters(spec: str) -> int:
    from gguf import GGUFReader

    from forgetless.models.causal_lm import gguf_file

    reader = GGUFReader(gguf_file(spec))
    return sum(int(t.n_elements) for t in reader.tensors)  # logical sizes, not quantized


def gpu_memory_gb(configured: float | None) -> tuple[float, str]:
    """The GPU's memory in GiB and where that figure came from: `resources.gpu_memory_gb`,
    else $FORGETLESS_GPU_MEMORY_GB, else an 80 GB card."""
    if configured is not None:
        return configured, "resources.gpu_memory_gb"
    if os.environ.get(GPU_MEMORY_ENV):
        try:
            return float(os.environ[GPU_MEMORY_ENV]), f"${GPU_MEMORY_ENV}"
        except ValueError:
            raise ConfigError(
                f"${GPU_MEMORY_ENV}: {os.environ[GPU_MEMORY_ENV]!r} is not a number of GB"
            ) from None
    return DEFAULT_GPU_MEMORY_GB, "default: an 80 GB GPU"


def check_gpu_share(footprint: Footprint, gpu: float, memory_gb: float, source: str,
                    label: str) -> None:  # fmt: skip
    """Refuse a GPU share too small for the weights, gradients and optimizer state. A cell
    runs on one device, so a share above 1 holds one GPU's memory."""
    if gpu <= 0:
        return
    held = min(gpu, 1.0) * memory_gb * GIB
    if footprint.total > held:
        needed = footprint.total / (memory_gb * GIB)
        fix = f"raise resources.gpu to at least {needed:.2g}, " if needed <= 1 else ""
        raise ConfigError(
            f"resources.gpu: {gpu} of a {memory_gb:g} GB GPU ({source}) holds "
            f"{held / GIB:.3g} GiB, but cell {label} needs {footprint.total / GIB:.3g} GiB "
            f"before any activation ({footprint.describe()}); {fix}give the GPU's memory as "
            "resources.gpu_memory_gb, or shrink the cell (model.dtype: bfloat16, an optimizer "
            "without state, a smaller model)"
        )
