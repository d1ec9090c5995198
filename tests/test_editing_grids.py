"""The editing reproduction grids validate: grids/paper/wise_zsre.yaml and larimar_zsre.yaml
(WISE and Larimar on ZsRE at the papers' hyper-parameters) with the model swapped for a
tiny random checkpoint of the same family and the data for the ZsRE sample in
../shared/data, and grids/wise_sharding.yaml as it is."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from shared_data import SHARED_DATA

from forgetless.core.schema import ConfigError
from forgetless.experiments.cli import main as cli
from forgetless.experiments.config import grid_from_dict, load_grid
from forgetless.models.causal_lm import bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ZSRE = SHARED_DATA / "zsre" / "zsre_mend_train.sample.json"
SAMPLE_RECORDS = 60
SPECIAL = {"vocab_size": 300, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
TINY = {
    # LLaMA-2-7B's family, with its 32 blocks: the grid's layers (27, 21) must exist.
    "llama": lambda: T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=32,
                                   num_attention_heads=2, num_key_value_heads=2, **SPECIAL),
    "gpt2": lambda: T.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=256, **SPECIAL),
}  # fmt: skip


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_checkpoint(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(TINY[family]()).save_pretrained(folder)
    bpe_tokenizer(["What is the product made by UniFirst?"], 300).save_pretrained(folder)
    return folder


def on_the_sample(grid: dict, checkpoint: Path, tmp_path: Path) -> dict:
    """The grid with its model and ZsRE files swapped for the tiny checkpoint and the sample
    (T capped at what the sample holds, leaving records for the unrelated prompts)."""
    grid = copy.deepcopy(grid)
    grid["model"]["name"] = f"hf:{checkpoint}"
    for stream in grid["streams"]:
        stream.update(path=str(ZSRE), edits=min(stream["edits"], SAMPLE_RECORDS // 2))
    for strategy in grid["strategies"]:
        if "corpus" in strategy:
            strategy["corpus"] = str(ZSRE)
    grid["storage"] = str(tmp_path / "runs")
    return grid


def read(name: str) -> dict:
    return yaml.safe_load((ROOT / "grids" / name).read_text())


def test_the_wise_zsre_grid_validates_on_a_tiny_llama_at_the_paper_s_settings(tmp_path):
    source = read("paper/wise_zsre.yaml")
    assert source["model"]["name"] == "hf:meta-llama/Llama-2-7b-hf"
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):  # as written, offline
        grid_from_dict({**source, "streams": [{**source["streams"][0], "path": str(ZSRE)}]})
    checkpoint = tiny_checkpoint(tmp_path / "llama", "llama")
    grid = grid_from_dict(on_the_sample(source, checkpoint, tmp_path))
    assert {c.strategy for c in grid.cells} == {"wise", "ft_l", "grace"}
    assert sorted({c.config["stream"]["edits"] for c in grid.cells}) == [1, 10, 30]
    wise = next(c.config["strategy"] for c in grid.cells if c.strategy == "wise")
    assert (wise["layer"], wise["steps"], wise["act_margin"], wise["act_ratio"]) == (
        27,
        70,
        [5.0, 20.0, 10.0],
        0.88,
    )
    path = tmp_path / "wise_zsre.yaml"
    path.write_text(yaml.safe_dump(on_the_sample(source, checkpoint, tmp_path)))
    assert cli(["validate", str(path)]) == 0  # and its GPU share holds the tiny model


def test_the_larimar_zsre_grid_validates_on_a_tiny_gpt2(tmp_path):
    source = read("paper/larimar_zsre.yaml")
    checkpoint = tiny_checkpoint(tmp_path / "gpt2", "gpt2")
    grid = grid_from_dict(on_the_sample(source, checkpoint, tmp_path))
    assert [c.strategy for c in grid.cells] == ["larimar"] * 2  # T = 10 and 30 on the sample
    assert grid.cells[0].config["strategy"]["slots"] == 384


def test_the_wise_sharding_grid_merges_within_its_stream_beside_one_memory_per_edit():
    grid = load_grid(ROOT / "grids" / "wise_sharding.yaml")
    assert len(grid.cells) == 3 and len({c.variant for c in grid.cells}) == 3
    edits = grid.cells[0].config["stream"]["edits"]
    shapes = sorted(
        (c.config["strategy"]["save_freq"], c.config["strategy"]["merge_freq"],
         c.config["strategy"]["retrieve"]) for c in grid.cells
    )  # fmt: skip
    assert shapes == [(1, 1000, True), (10, 20, False), (10, 20, True)]
    assert edits // 20 == 5  # five TIES merges of two shards each within the stream
