"""HFT and LoRA on a tiny random Llama: what each freezes, trains, merges and checkpoints."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from mlflow import MlflowClient

from forgetless.core.schema import ConfigError
from forgetless.experiments import checkpoint
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import build_cell, run_grid, trainable_fraction
from forgetless.strategies import TrainConfig
from forgetless.strategies.hft import HalfFineTuning, HFTConfig
from forgetless.streams import Experience, Stream

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FEED_FORWARD = ("gate_proj", "up_proj", "down_proj")
STREAM = {"name": "instructions", "tasks": ["uppercase", "reverse", "shift"],
          "train_size": 16, "test_size": 8, "base": None}  # fmt: skip
MODEL = {"name": "llama_tiny", "layers": 4, "hidden": 32, "heads": 2, "intermediate": 64,
         "context": 64}  # fmt: skip
TRAIN = {"epochs": 1, "batch_size": 8, "lr": 0.01, "optimizer": "adamw"}
# By hand: in every block q, k, v, o are 32x32 (1024) and gate, up, down 32x64 (2048).
BLOCK_MATRICES = 4 * (4 * 1024 + 3 * 2048)
# LoRA r=4 on q_proj and v_proj: A is 4x32 and B 32x4, in 4 blocks, float32.
ONE_ADAPTER_BYTES = 4 * 2 * (4 * 32 + 32 * 4) * 4


pytestmark = pytest.mark.usefixtures("one_thread")


def build(strategy: str | dict, seed: int = 0):
    grid = grid_from_dict({
        "name": "partial-tuning", "seeds": [seed], "streams": [STREAM], "model": MODEL,
        "train": TRAIN, "strategies": [strategy],
    })  # fmt: skip
    return build_cell(grid.cells[0], "cpu")


def lora(mode: str, **params) -> dict:
    return {"name": "lora", "r": 4, "alpha": 8, "mode": mode, **params}


@torch.no_grad()
def logits(strategy, experience) -> torch.Tensor:
    strategy.model.eval()
    out = strategy.model(experience.test.x)
    strategy.model.train()
    return out


def frozen_matrices(strategy) -> torch.Tensor:
    """[block, q k v o gate up down] -> frozen, read from the transformers modules."""
    layers = strategy.model.model.model.layers
    return torch.tensor([
        [not getattr(layer.self_attn, n).weight.requires_grad for n in ATTENTION]
        + [not getattr(layer.mlp, n).weight.requires_grad for n in FEED_FORWARD]
        for layer in layers
    ])  # fmt: skip


def base_weights(strategy) -> dict[str, torch.Tensor]:
    """The model's own weights by their transformers names, whatever peft wraps around them."""
    inner = strategy.model.model
    model = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {n.replace(".base_layer", ""): p.detach().clone()
            for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip


def adapter_names(strategy) -> set[str]:
    found = (re.search(r"\.lora_[AB]\.([^.]+)\.", n) for n, _ in strategy.model.named_parameters())
    return {m.group(1) for m in found if m}


def optimized(strategy) -> set[int]:
    return {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}


# --- HFT -------------------------------------------------------------------------------


def test_hft_freezes_two_attention_and_alternately_two_then_one_ffn_matrices_per_block():
    stream, hft = build("hft")
    for experience in stream.experiences[:2]:
        hft.train(experience)
        frozen = frozen_matrices(hft)
        assert frozen[:, :4].sum(dim=1).tolist() == [2, 2, 2, 2]
        assert frozen[:, 4:].sum(dim=1).tolist() == [2, 1, 2, 1]


def test_hft_draws_a_new_half_each_experience_and_the_same_halves_for_the_same_seed():
    def halves(seed: int) -> list[torch.Tensor]:
        stream, hft = build("hft", seed)
        out = []
        for experience in stream.experiences[:2]:
            hft.train(experience)
            out.append(frozen_matrices(hft))
        return out

    first, second = halves(0)
    assert not torch.equal(first, second)
    again = halves(0)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])


def test_hft_leaves_frozen_matrices_out_of_the_optimizer():
    stream, hft = build("hft")
    hft.train(stream.experiences[0])
    trainable = {id(p) for p in hft.model.parameters() if p.requires_grad}
    assert optimized(hft) == trainable
    layers = hft.model.model.model.layers
    for layer, frozen in zip(layers, frozen_matrices(hft).tolist()):
        modules = [getattr(layer.self_attn, n) for n in ATTENTION]
        modules += [getattr(layer.mlp, n) for n in FEED_FORWARD]
        for module, is_frozen in zip(modules, frozen):
            assert (id(module.weight) in optimized(hft)) is not is_frozen
            # Adam keeps moments only for what it updates.
            assert (module.weight in hft.optimizer.state) is not is_frozen


@pytest.mark.parametrize("freeze_embeddings", [False, True])
def test_hft_freezes_exactly_half_of_the_block_matrices(freeze_embeddings):
    stream, hft = build({"name": "hft", "freeze_embeddings": freeze_embeddings})
    hft.train(stream.experiences[0])
    layers = hft.model.model.model.layers
    frozen_numel = sum(
        getattr(part, n).weight.numel()
        for layer, frozen in zip(layers, frozen_matrices(hft).tolist())
        for (part, n), is_frozen in zip(
            [(layer.self_attn, n) for n in ATTENTION] + [(layer.mlp, n) for n in FEED_FORWARD],
            frozen,
        )
        if is_frozen
    )
    assert frozen_numel == BLOCK_MATRICES // 2 == 20480
    total = sum(p.numel() for p in hft.model.parameters())
    outside = [
        hft.model.model.model.embed_tokens.weight,
        hft.model.model.lm_head.weight,
        hft.model.model.model.norm.weight,
        *(p for layer in layers for n, p in layer.named_parameters() if "norm" in n),
    ]
    if freeze_embeddings:
        assert not any(p.requires_grad for p in outside)
        assert trainable_fraction(hft.model) == pytest.approx((BLOCK_MATRICES // 2) / total)
    else:
        assert all(p.requires_grad for p in outside)
        assert trainable_fraction(hft.model) == pytest.approx(1 - (BLOCK_MATRICES // 2) / total)


def test_hft_frozen_weights_stay_bit_identical_while_trainable_ones_change():
    stream, hft = build("hft")
    before = {n: p.detach().clone() for n, p in hft.model.named_parameters()}
    hft.train(stream.experiences[0])
    changed = frozen = 0
    for name, p in hft.model.named_parameters():
        if not re.search(r"_proj\.weight$", name):
            continue
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} is trainable but did not change"
            changed += 1
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
            frozen += 1
    assert (changed, frozen) == (14, 14)


def test_hft_checkpoint_resumes_with_the_same_half_and_optimizer_state(tmp_path):
    stream, trained = build("hft")
    trained.train(stream.experiences[0])
    rng = checkpoint.rng_state()
    path = str(tmp_path / "hft.pt")
    checkpoint.save(path, {"strategy": trained.state_dict()})

    _, fresh = build("hft")
    fresh.load_state_dict(checkpoint.load(path)["strategy"])  # weights_only=True
    assert torch.equal(frozen_matrices(fresh), frozen_matrices(trained))
    saved, loaded = trained.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, loaded["state"][key][name])

    for strategy in (trained, fresh):
        checkpoint.set_rng_state(rng)
        strategy.train(stream.experiences[1])
    assert torch.equal(frozen_matrices(fresh), frozen_matrices(trained))
    assert torch.equal(logits(fresh, stream.experiences[0]), logits(trained, stream.experiences[0]))


def test_hft_refuses_a_model_without_llama_style_blocks_naming_its_modules():
    gpt2_like = torch.nn.ModuleDict(
        {"c_attn": torch.nn.Linear(4, 12), "wte": torch.nn.Embedding(8, 4)}
    )
    stream = Stream("s", "instruction", [Experience(0, "e", None, None, kind="generation")])
    with pytest.raises(ConfigError, match=r"self_attn.*c_attn \(Linear\), wte \(Embedding\)"):
        HalfFineTuning(gpt2_like, HFTConfig(), TrainConfig(), stream)


# --- LoRA ------------------------------------------------------------------------------


def test_lora_trains_only_the_adapter_and_leaves_base_weights_unchanged():
    stream, strategy = build(lora("shared"))
    trainable = [n for n, p in strategy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.shared." in n or ".lora_B.shared." in n for n in trainable)
    assert optimized(strategy) == {id(p) for p in strategy.model.parameters() if p.requires_grad}
    base, untrained = base_weights(strategy), logits(strategy, stream.experiences[0])
    for experience in stream.experiences[:2]:
        strategy.train(experience)
    after = base_weights(strategy)
    assert base.keys() == after.keys()
    assert all(torch.equal(base[n], after[n]) for n in base)
    assert not torch.equal(untrained, logits(strategy, stream.experiences[0]))
    assert adapter_names(strategy) == {"shared"}
    assert strategy.memory_bytes() == ONE_ADAPTER_BYTES == 8192


def test_lora_lr_is_the_adapters_rate_for_every_adapter_and_its_warm_up():
    stream, strategy = build(lora("per_task_merge", lr=0.002))
    assert [g["lr"] for g in strategy.optimizer.param_groups] == [0.002]
    strategy.train_config = dataclasses.replace(strategy.train_config, warmup_steps=4)
    strategy.train(stream.experiences[0])  # ends past warm-up; then a fresh adapter
    assert [g["lr"] for g in strategy.optimizer.param_groups] == [0.002]
    _, plain = build(lora("shared"))
    assert [g["lr"] for g in plain.optimizer.param_groups] == [TRAIN["lr"]]
    with pytest.raises(ConfigError, match=r"strategies\[0\]\.lr: must be greater than 0"):
        build(lora("shared", lr=0))


def test_lora_per_task_merge_folds_the_adapter_into_the_base_weights_keeping_the_function():
    stream, strategy = build(lora("per_task_merge"))
    experience = stream.experiences[0]
    base = base_weights(strategy)
    seen = {}
    merge = strategy.after_experience

    def look_then_merge(experience):
        seen["logits"] = logits(strategy, experience)
        merge(experience)

    strategy.after_experience = look_then_merge
    strategy.train(experience)
    torch.testing.assert_close(logits(strategy, experience), seen["logits"], atol=1e-5, rtol=0)
    merged = base_weights(strategy)
    for name in merged:
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(merged[name], base[name]), f"{name} did not absorb the adapter"
        else:
            assert torch.equal(merged[name], base[name]), f"{name} is not adapted but changed"
    # The trained adapter is gone; the next task's fresh one (B = 0) is the only one held.
    assert adapter_names(strategy) == {"task_1"}
    lora_b = [p for n, p in strategy.model.named_parameters() if ".lora_B." in n]
    assert lora_b and all(not p.any() for p in lora_b)
    assert strategy.memory_bytes() == ONE_ADAPTER_BYTES


def test_lora_per_task_keeps_earlier_adapters_frozen_and_active():
    stream, strategy = build(lora("per_task"))
    strategy.train(stream.experiences[0])
    first = {n: p.detach().clone() for n, p in strategy.model.named_parameters() if "task_0" in n}
    strategy.train(stream.experiences[1])
    assert adapter_names(strategy) == {"task_0", "task_1"}
    for name, p in strategy.model.named_parameters():
        if "task_0" in name:
            assert not p.requires_grad and torch.equal(p, first[name])
        elif "task_1" in name:
            assert p.requires_grad
    q_proj = strategy.model.model.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.active_adapters == ["task_0", "task_1"]
    assert strategy.memory_bytes() == 2 * ONE_ADAPTER_BYTES


@pytest.mark.parametrize("mode", ["shared", "per_task_merge", "per_task"])
def test_lora_state_round_trips_to_identical_logits_and_training(mode, tmp_path):
    stream, trained = build(lora(mode))
    trained.train(stream.experiences[0])
    rng = checkpoint.rng_state()
    path = str(tmp_path / "lora.pt")
    checkpoint.save(path, {"strategy": trained.state_dict()})

    _, fresh = build(lora(mode))
    fresh.load_state_dict(checkpoint.load(path)["strategy"])  # weights_only=True
    probe = stream.experiences[0]
    assert torch.equal(logits(fresh, probe), logits(trained, probe))
    assert fresh.memory_bytes() == trained.memory_bytes()
    for strategy in (trained, fresh):
        checkpoint.set_rng_state(rng)
        strategy.train(stream.experiences[1])
    assert torch.equal(logits(fresh, probe), logits(trained, probe))
    assert adapter_names(fresh) == adapter_names(trained)


def test_lora_refuses_a_target_module_the_model_lacks_listing_its_linear_modules():
    with pytest.raises(ConfigError) as error:
        build(lora("shared", target_modules=["q_proj", "qkv_proj"]))
    message = str(error.value)
    assert "strategy.target_modules" in message and "'qkv_proj'" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert "lm_head" in message


# --- end to end ------------------------------------------------------------------------


def test_hft_and_lora_grids_finish_with_a_partial_trainable_fraction(write_grid, tracking_uri):
    grid = write_grid(
        streams=[{**STREAM, "tasks": STREAM["tasks"][:2]}],
        model=MODEL,
        train=TRAIN,
        strategies=["hft", lora("per_task"), lora("per_task_merge")],
    )
    outcomes = run_grid(grid, tracking_uri)
    assert [o.status for o in outcomes] == ["FINISHED"] * 3, [o.error for o in outcomes]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(grid.name)
    runs = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    assert len(runs) == 3
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "trainable_fraction")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1]
        assert all(0 < m.value < 1 for m in history)
        if run.data.tags["forgetless.strategy"] == "lora":
            assert all(m.value < 0.05 for m in history)  # two 4-rank adapters on a 32-wide model


def test_methods_combine_with_rehearsal_through_one_declaration():
    import dataclasses

    from forgetless.strategies import strategy_class

    combined = strategy_class("hft+rehearsal", "strategies[0]")
    fields = {f.name for f in dataclasses.fields(combined.Config)}
    assert {"freeze_embeddings", "buffer", "replay_batch_size"} <= fields
    assert combined.supports == ("generation",)
    with pytest.raises(ConfigError, match="both take 'buffer'"):
        strategy_class("rehearsal+rehearsal", "strategies[0]")
    with pytest.raises(ConfigError, match="cannot be combined"):
        strategy_class("avalanche.EWC+rehearsal", "strategies[0]")
