"""Language-model cells: the cached pre-trained base, and the stream turned into token ids.

The base model is trained once per (model config, base mixture) on the general mixture
with the platform's own training loop, saved as safetensors under the cache folder
($FORGETLESS_CACHE, default ~/.cache/forgetless) and loaded by every later cell. A
file lock makes concurrent cells on one machine wait for one training, not repeat it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import typing
from pathlib import Path
from typing import Any

from filelock import FileLock
from safetensors.torch import load_model, save_model
from torch import nn

from forgetless.core.cache import cache_dir
from forgetless.experiments import checkpoint
from forgetless.experiments.config import without_defaults
from forgetless.experiments.editing import encode_edit_stream
from forgetless.models import model_factory
from forgetless.models.causal_lm import CausalLM
from forgetless.strategies import NoParams, TrainConfig
from forgetless.strategies.naive import Naive
from forgetless.streams import Experience, Stream
from forgetless.streams.instructions import BaseMixture

log = logging.getLogger(__name__)


def base_path(model_config: dict[str, Any], base: BaseMixture) -> Path:
    """The cache file of a base: keyed, as cells are, by the fields not at their default,
    so a new model field that keeps the old behaviour keeps every cached base."""
    declared = typing.get_type_hints(model_factory(model_config["name"], "model"))["config"]
    model = {"name": model_config["name"],
             **without_defaults({k: v for k, v in model_config.items() if k != "name"},
                                declared)}  # fmt: skip
    identity = {"model": model, "base": dataclasses.asdict(base.config)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "base" / f"{model_config['name'].replace(':', '_')}-{key}.safetensors"


def load_or_train_base(model: CausalLM, base: BaseMixture, model_config: dict[str, Any]) -> Path:
    """Give `model` the base weights, training them first if no cell has yet."""
    path = base_path(model_config, base)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.warning("pre-training the base model once (cached at %s)", path)
            _train_base(model, base)
            tmp = path.with_suffix(".tmp")
            save_model(model, str(tmp))
            os.replace(tmp, path)
    load_model(model, str(path), device=str(next(model.parameters()).device))
    return path


def _train_base(model: CausalLM, base: BaseMixture) -> None:
    cfg = base.config
    saved = checkpoint.rng_state()  # the cell's RNG stream must not depend on the cache
    checkpoint.seed_everything(0)
    train = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        optimizer="adamw",
        warmup_steps=cfg.warmup_steps,
        decay=getattr(cfg, "decay", "constant"),  # the fact corpus's base decays its rate
    )
    # A corpus whose config has no `learn_prompts` (the editing facts) learns answers only.
    prompts = getattr(cfg, "learn_prompts", False)
    samples = model.encode(base.train, label_prompts=prompts)
    mixture = Experience(0, "base", samples, None, kind="generation")
    Naive(model, NoParams(), train, Stream("base", "instruction", [mixture])).train(mixture)
    checkpoint.set_rng_state(saved)


def prepare_stream(stream: Stream, model: nn.Module, model_config: dict[str, Any]) -> Stream:
    """Once per cell, before the first score: a language-model stream gets its base model
    (trained once per machine and cached), becomes token ids, and an edit stream caches
    the model's own answers to its locality prompts before any edit."""
    if stream.kind == "classification":
        return stream
    if stream.base is not None:
        load_or_train_base(model, stream.base, model_config)
    return (
        encode_edit_stream(stream, model) if stream.kind == "edit" else encode_stream(stream, model)
    )


def encode_stream(stream: Stream, model: CausalLM) -> Stream:
    """The stream with every text set as token ids and labels, in the model's tokenizer."""
    texts = [x for e in stream for x in (*e.train, *e.test)] + list(stream.general or [])
    width = model.width(texts)  # one width for the stream: its sets concatenate
    experiences = [
        dataclasses.replace(e, train=model.encode(e.train, width), test=model.encode(e.test, width))
        for e in stream
    ]
    general = None if stream.general is None else model.encode(stream.general, width)
    return dataclasses.replace(stream, experiences=experiences, general=general)
