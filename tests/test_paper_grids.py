"""The paper reproduction grids (grids/paper/) validate as written, with their model
swapped for a tiny random checkpoint and their data for small files in each benchmark's
format; their task order and scores are the papers'; and the GPU check sizes LLaMA-2-7B
(built from its config on the meta device) into the grid's 80 GB share."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from forgetless.core.schema import ConfigError
from forgetless.experiments.cli import cmd_validate
from forgetless.experiments.config import build_params, grid_from_dict
from forgetless.experiments.footprint import parameter_count
from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
from forgetless.streams import build_stream
from forgetless.streams.instructions import InstructionsConfig

GRIDS = Path(__file__).resolve().parents[1] / "grids" / "paper"
LLAMA = "hf:~/models/Llama-2-7b-chat-hf"
TRACE = "~/data/TRACE/LLM-CL_Benchmark"
SUPERNI = "~/data/natural-instructions/tasks"
TRACE_ORDER = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm",
               "NumGLUE-ds", "20Minuten"]  # fmt: skip
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, head_dim=128,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FORGETLESS_GPU_MEMORY_GB", raising=False)
    parameter_count.cache_clear()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    torch.manual_seed(0)
    model = llama_tiny(LlamaTinyConfig(layers=2, hidden=32, heads=2, intermediate=64), None)
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def write_trace(root: Path) -> None:
    for task in TRACE_ORDER:
        for split, n in (("train", 12), ("test", 6)):
            answer = "A\nBecause it is." if task == "ScienceQA" else "dovish"
            records = [{"prompt": f"{task} {split} {i}: ", "answer": answer} for i in range(n)]
            path = root / task / f"{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(records))


def write_superni(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        instances = [{"id": f"{name}-{i}", "input": f"input {i}", "output": [f"out {i}", "x"]}
                     for i in range(10)]  # fmt: skip
        task = {"Definition": [f"Do {name}."], "Instances": instances}
        (root / Path(name).name).write_text(json.dumps(task))


def localized(name: str, tmp_path: Path, model: str) -> dict:
    """The grid with its data under tmp_path (written there) and `model` for LLaMA-2."""
    text = (GRIDS / name).read_text()
    text = text.replace(TRACE, str(tmp_path / "trace")).replace(SUPERNI, str(tmp_path / "ni"))
    grid = yaml.safe_load(text.replace(LLAMA, model))
    write_trace(tmp_path / "trace")
    tasks = grid["streams"][0]["tasks"]
    write_superni(tmp_path / "ni", [t for t in tasks if isinstance(t, str)])
    return grid


def test_hft_trace_grid_validates_with_tracess_order_and_metrics(tmp_path, tiny_checkpoint):
    grid = grid_from_dict(localized("hft_trace.yaml", tmp_path, f"hf:{tiny_checkpoint}"))
    assert sorted(c.strategy for c in grid.cells) == ["hft", "naive"]
    cell = grid.cells[0]
    assert cell.config["train"]["accumulate"] * cell.config["train"]["batch_size"] == 128
    config = build_params(InstructionsConfig, cell.config["stream"], "stream")
    stream = build_stream("instructions", config, cell.seed)
    assert [e.name for e in stream] == TRACE_ORDER
    metrics = {e.name: e.info["metrics"] for e in stream}
    assert metrics["FOMC"] == ["accuracy"] and metrics["MeetingBank"] == ["rougeL"]
    assert metrics["ScienceQA"] == ["option_accuracy", "reasoning_rougeL"]
    assert len(stream.experiences[0].test) == 6  # TRACE's own test file, whole


def test_ssr_superni_grid_validates_with_the_papers_ten_tasks(tmp_path, tiny_checkpoint):
    grid = grid_from_dict(localized("ssr_superni.yaml", tmp_path, f"hf:{tiny_checkpoint}"))
    assert sorted(c.strategy for c in grid.cells) == ["lora", "lora+rehearsal", "lora+ssr"]
    config = build_params(InstructionsConfig, grid.cells[0].config["stream"], "stream")
    stream = build_stream("instructions", config, 0)
    assert len(stream) == 10 and stream.experiences[0].name.startswith("task024_cosmosqa")
    assert all(e.info["metrics"] == ["rougeL", "exact_match_norm"] for e in stream)
    assert stream.experiences[0].info["references"][0][1] == "x"  # every output kept


def llama2_7b_config(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """LLaMA-2-7B's config.json (no weights) beside the tiny model's tokenizer."""
    folder = tmp_path / "llama2-7b"
    folder.mkdir()
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(LLAMA2_7B, max_position_embeddings=4096)
    (folder / "config.json").write_text(json.dumps(config))
    for file in tiny_checkpoint.iterdir():
        if "token" in file.name:
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


@pytest.mark.parametrize("name", ["hft_trace.yaml", "ssr_superni.yaml"])
def test_validate_fits_llama2_7b_in_bf16_on_an_80_gb_gpu_and_not_in_fp32(
    name, tmp_path, tiny_checkpoint, capsys
):
    folder = llama2_7b_config(tmp_path, tiny_checkpoint)
    grid = localized(name, tmp_path, f"hf:{folder}")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert cmd_validate(argparse.Namespace(grid=str(path))) == 0
    assert "6.74B params" in capsys.readouterr().out
    grid["model"]["dtype"] = "float32"  # 6.74B x 16 bytes with AdamW: 100 GiB
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(ConfigError, match=r"resources\.gpu: 1\.0 of a 80 GB GPU"):
        cmd_validate(argparse.Namespace(grid=str(path)))
