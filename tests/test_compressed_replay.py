"""REMIND and latent replay: byte budgets with the codebook, codec error, determinism,
checkpoints, latent augmentation, and the bad inputs refused before training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from forgetless.core.schema import ConfigError
from forgetless.experiments import checkpoint, tracking
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import score_stream
from forgetless.experiments.runner import build_cell, run_cell
from forgetless.models import LatentCNNConfig, ResNet18Config, latent_cnn, resnet18, split_model
from forgetless.strategies import TrainConfig
from forgetless.strategies.quantize import (
    Float16Codec,
    ProductQuantizer,
    from_vectors,
    to_vectors,
)
from forgetless.strategies.remind import Remind, RemindConfig, random_resized_crop
from forgetless.streams import Experience, Samples, Stream

BASE_STREAM = {"name": "split_digits", "n_experiences": 4, "base_classes": 4}
TRAIN = {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9}
REMIND = {"name": "remind", "bytes": 1625, "subquantizers": 1, "bits": 3,
          "base": "autoencoder", "base_epochs": 2}  # fmt: skip


def build(strategy: dict, seed: int = 0, stream: dict = BASE_STREAM, train: dict = TRAIN):
    grid = grid_from_dict({
        "name": "remind-test", "seeds": [seed], "streams": [stream],
        "model": {"name": "latent_cnn"}, "train": train, "strategies": [strategy],
    })  # fmt: skip
    return build_cell(grid.cells[0], "cpu")


# --- the budget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        REMIND,
        {**REMIND, "streaming": True, "crop_min_scale": 0.3, "mixup_alpha": 0.1},
        {"name": "latent_replay", "bytes": 700, "base": "autoencoder", "base_epochs": 2},
    ],
    ids=["remind", "remind-streaming-augmented", "latent_replay"],
)
def test_budget_is_never_exceeded_codebook_included(strategy, monkeypatch):
    stream, remind = build(strategy, train={**TRAIN, "batch_size": 8})
    seen_bytes = []
    add = remind.memory.add

    def add_and_measure(samples):  # streaming adds after every step
        add(samples)
        seen_bytes.append(remind.memory_bytes())

    monkeypatch.setattr(remind.memory, "add", add_and_measure)
    for experience in stream:
        remind.train(experience)
        assert remind.memory_bytes() <= strategy["bytes"]
    assert seen_bytes and max(seen_bytes) <= strategy["bytes"]
    codebook = remind.codec.codebook_bytes
    assert remind.memory_bytes() == remind.memory.nbytes + codebook
    # The budget is used: it holds `capacity` samples and not one more.
    assert len(remind.memory) == remind.capacity
    assert codebook + (remind.capacity + 1) * remind.sample_bytes > strategy["bytes"]


def test_pq_memory_holds_packed_codes_and_one_byte_labels():
    stream, remind = build(REMIND)
    assert remind.latent_shape == (2, 4, 4)
    assert remind.codec.codebook_bytes == 2 * 1 * 8 * 2  # M x 2**bits x dsub, float16
    assert remind.sample_bytes == 6 + 1  # 16 locations x 3 bits, packed; a label byte
    assert remind.capacity == (1625 - 32) // 7
    remind.train(stream.experiences[0])
    assert remind.memory.samples.x.dtype == torch.uint8
    assert remind.memory.samples.y.dtype == torch.uint8
    assert remind.memory.samples.x.shape[1] == 6


@pytest.mark.parametrize("subquantizers, bits, size", [(2, 4, 4), (2, 5, 5), (4, 3, 6), (4, 8, 16)])
def test_pq_codes_are_bit_packed_per_sample_and_decode_as_faiss_does(subquantizers, bits, size):
    torch.manual_seed(0)
    latents = torch.randn(400, 4, 2, 2)
    pq = ProductQuantizer((4, 2, 2), subquantizers, bits)
    pq.fit(to_vectors(latents))
    codes = pq.encode(latents)
    assert codes.shape == (400, size) == (400, pq.code_bytes())
    per_location = pq.pq.decode(pq.pq.compute_codes(to_vectors(latents)))
    assert torch.equal(pq.decode(codes), from_vectors(per_location, (4, 2, 2)))


# --- the codec -----------------------------------------------------------------------------


def test_pq_error_is_bounded_and_falls_as_bits_grow():
    torch.manual_seed(0)
    # Correlated latents, as a network makes them: 4 x 3 x 3 maps from 3 hidden factors.
    latents = (torch.randn(600, 3) @ torch.randn(3, 36)).reshape(600, 4, 3, 3)
    latents = latents + 0.1 * torch.randn_like(latents)
    variance = to_vectors(latents).var(axis=0).sum() / 4
    errors = []
    for bits in (1, 2, 4, 6, 8):
        pq = ProductQuantizer((4, 3, 3), subquantizers=2, bits=bits)
        pq.fit(to_vectors(latents))
        decoded = pq.decode(pq.encode(latents))
        assert decoded.shape == latents.shape and decoded.dtype == torch.float32
        errors.append(torch.mean((decoded - latents) ** 2).item())
    assert errors[0] < variance  # even 2 centroids beat predicting the mean
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.05 * variance, (errors, variance)


def test_pq_codebook_is_stored_as_float16_and_codes_use_the_stored_codebook():
    torch.manual_seed(0)
    latents = torch.randn(300, 4, 2, 2)
    pq = ProductQuantizer((4, 2, 2), subquantizers=2, bits=4)
    pq.fit(to_vectors(latents))
    assert pq.codebook.dtype == torch.float16 and pq.codebook.shape == (2, 16, 2)
    restored = ProductQuantizer((4, 2, 2), subquantizers=2, bits=4)
    restored.load_state_dict(pq.state_dict())
    assert torch.equal(restored.encode(latents), pq.encode(latents))
    codes = pq.encode(latents)
    assert torch.equal(restored.decode(codes), pq.decode(codes))


def test_float16_codec_error_is_float16_rounding():
    latents = torch.randn(50, 4, 2, 2)
    codec = Float16Codec((4, 2, 2))
    decoded = codec.decode(codec.encode(latents))
    assert torch.allclose(decoded, latents, rtol=2**-11, atol=1e-7)
    assert codec.code_bytes() == 2 * 16 and codec.codebook_bytes == 0


# --- determinism and checkpoints -----------------------------------------------------------


def scores(strategy: dict, seed: int) -> tuple[list[list[float]], torch.Tensor]:
    stream, remind = build(strategy, seed)
    rows = []
    for experience in stream:
        remind.train(experience)
        rows.append(score_stream(remind, stream)[0])
    return rows, remind.memory.samples.x


def test_same_seed_gives_the_same_run_and_memory():
    strategy = {**REMIND, "crop_min_scale": 0.5, "mixup_alpha": 0.2}
    rows_a, codes_a = scores(strategy, seed=3)
    rows_b, codes_b = scores(strategy, seed=3)
    assert rows_a == rows_b and torch.equal(codes_a, codes_b)
    rows_c, _ = scores(strategy, seed=4)
    assert rows_c != rows_a


@pytest.mark.parametrize("base", ["classifier", "autoencoder"])
def test_state_round_trips_through_a_weights_only_checkpoint(base):
    strategy = {**REMIND, "base": base}
    stream, trained = build(strategy)
    first, *rest = stream.experiences
    trained.train(first)
    blob = io.BytesIO()
    torch.save({"strategy": trained.state_dict(), "rng": checkpoint.rng_state()}, blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)

    _, resumed = build(strategy)
    resumed.load_state_dict(state["strategy"])
    checkpoint.set_rng_state(state["rng"])
    for experience in rest:
        resumed.train(experience)
    checkpoint.set_rng_state(state["rng"])
    for experience in rest:
        trained.train(experience)
    assert score_stream(resumed, stream)[0] == score_stream(trained, stream)[0]
    assert torch.equal(resumed.memory.samples.x, trained.memory.samples.x)
    assert torch.equal(resumed.codec.codebook, trained.codec.codebook)
    assert not any(p.requires_grad for p in resumed.model.lower.parameters())
    for a, b in zip(trained.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resumed_cell_equals_uninterrupted_run(
    write_grid, tracking_uri, tmp_path, monkeypatch, logged_matrix
):
    fields = dict(streams=[BASE_STREAM], model={"name": "latent_cnn"}, train=TRAIN,
                  strategies=[{**REMIND, "mixup_alpha": 0.1}])  # fmt: skip
    grid = write_grid(**fields)
    reference = write_grid(name=grid.name + "-reference", **fields)
    cell = grid.cells[0]
    reference_run = tracking.open_grid(tracking_uri, reference.name, 1, reference.source)
    assert run_cell(cell, reference_run, str(tmp_path / "a")).status == "FINISHED"
    grid_run = tracking.open_grid(tracking_uri, grid.name, 1, grid.source)

    original = Remind.train

    def killed_at_third(self, experience):
        if experience.index == 2:
            raise KeyboardInterrupt  # as if the worker died mid-cell
        original(self, experience)

    monkeypatch.setattr(Remind, "train", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        run_cell(cell, grid_run, str(tmp_path / "b"))
    monkeypatch.setattr(Remind, "train", original)
    path = str(tmp_path / "b" / grid.name / cell.hash / "checkpoint.pt")
    assert checkpoint.load(path)["next"] == 2
    assert run_cell(cell, grid_run, str(tmp_path / "b")).status == "FINISHED"
    full = logged_matrix(tracking_uri, reference.name, cell.hash)
    again = logged_matrix(tracking_uri, grid.name, cell.hash)
    assert np.array_equal(full, again)


@pytest.mark.parametrize("score_decoded", [True, False])
def test_scoring_decodes_test_latents_only_when_asked(score_decoded):
    stream, remind = build({**REMIND, "score_decoded": score_decoded})
    remind.train(stream.experiences[0])
    remind.model.eval()
    x = stream.experiences[0].test.x[:20]
    latents = remind.model.lower(x)
    decoded = remind.codec.decode(remind.codec.encode(latents))
    expected = remind.model.upper(decoded if score_decoded else latents)
    assert torch.equal(remind.model(x), expected)
    assert not torch.equal(decoded, latents)


# --- latent augmentation -------------------------------------------------------------------


def test_random_resized_crop_keeps_shape_and_stays_within_each_map():
    torch.manual_seed(0)
    latents = torch.randn(64, 8, 7, 7)
    cropped = random_resized_crop(latents, 2 / 7)
    assert cropped.shape == latents.shape
    low = latents.flatten(2).min(2).values[..., None, None]
    high = latents.flatten(2).max(2).values[..., None, None]
    assert ((cropped >= low - 1e-5) & (cropped <= high + 1e-5)).all()  # bilinear: convex
    assert not torch.allclose(cropped, latents)


def test_mixup_blends_replayed_pairs_and_their_targets():
    torch.manual_seed(0)
    stream, remind = build({**REMIND, "mixup_alpha": 0.4, "replay_batch_size": 6})
    remind.train(stream.experiences[0])
    batch = remind.training_data(stream.experiences[1])
    composed = remind.compose(batch.subset(torch.arange(5)))
    assert len(composed) == 5 + 6
    assert composed.y.shape == (11, 10)
    assert torch.allclose(composed.y.sum(1), torch.ones(11))
    assert torch.equal(composed.y[:5].argmax(1), batch.y[:5])  # new samples are not mixed


# --- models with a split point -------------------------------------------------------------


def test_split_model_shares_modules_and_composes_to_the_model():
    stream = Stream("s", "class", [], 10, (1, 8, 8))
    model = latent_cnn(LatentCNNConfig(), stream).eval()
    lower, upper = split_model(model, "head", "split")
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(upper(lower(x)), model(x))
    assert {id(p) for p in lower.parameters()} | {id(p) for p in upper.parameters()} == {
        id(p) for p in model.parameters()
    }


def test_resnet18_splits_at_layer4_1_as_remind():
    model = resnet18(ResNet18Config(), Stream("s", "class", [], 100, (3, 64, 64))).eval()
    lower, upper = split_model(model, model.latent_split, "split")
    latents = lower(torch.rand(2, 3, 64, 64))
    assert latents.shape == (2, 512, 2, 2)  # 512 x 7 x 7 on 224 x 224 inputs
    assert upper(latents).shape == (2, 100)
    assert list(dict(upper.named_children())) == ["layer4", "pool", "fc"]
    assert len(upper.layer4) == 1 and len(lower.layer4) == 1


def test_remind_runs_on_resnet18_split_at_layer4_1_with_cifar_shaped_images():
    """REMIND's own setting (512-channel maps, 32 sub-quantizers of 8 bits), on a tiny
    stream of random 3x32x32 images so that it runs on a CPU in seconds."""
    torch.manual_seed(0)

    def images(n: int, classes: list[int]) -> Samples:
        return Samples(torch.rand(n, 3, 32, 32), torch.tensor(classes).repeat(n // len(classes)))

    experiences = [
        Experience(i, f"exp_{i}", images(n, c), images(4, c), info={"classes": c})
        for i, (n, c) in enumerate([(16, [0, 1]), (8, [2, 3])])
    ]
    stream = Stream("cifar_shaped", "class", experiences, 4, (3, 32, 32))
    model = resnet18(ResNet18Config(small_input=True), stream)
    config = RemindConfig(bytes=300_000, subquantizers=32, bits=8, base_epochs=1,
                          crop_min_scale=2 / 7, mixup_alpha=0.1)  # fmt: skip
    remind = Remind(model, config, TrainConfig(epochs=1, batch_size=8), stream)
    assert remind.split == "layer4.1" and remind.latent_shape == (512, 4, 4)
    assert remind.sample_bytes == 16 * 32 + 1
    assert remind.codec.codebook_bytes == 2 * 512 * 256
    for experience in stream:
        remind.train(experience)
    assert len(remind.memory) == 24 and remind.memory_bytes() <= 300_000
    assert score_stream(remind, stream)[0]


# --- bad input, refused before training ----------------------------------------------------


def test_budget_smaller_than_the_codebook_names_both_sizes():
    with pytest.raises(ConfigError, match=r"budget of 1000 bytes .* codebook of 1024 bytes"):
        build({**REMIND, "bytes": 1000, "bits": 8, "subquantizers": 1})


def test_budget_smaller_than_any_codebook_is_refused_at_grid_validation():
    with pytest.raises(
        ConfigError, match=r"strategies\[0\]\.bytes: 10 bytes cannot hold.*at least 16"
    ):
        grid_from_dict({"name": "g", "streams": [BASE_STREAM], "model": {"name": "latent_cnn"},
                        "strategies": [{**REMIND, "bytes": 10}]})  # fmt: skip


def test_budget_that_holds_the_codebook_but_no_sample_is_refused():
    with pytest.raises(ConfigError, match=r"hold no sample.*codebook takes 32 bytes.*sample 7"):
        build({**REMIND, "bytes": 35})


def test_subquantizers_not_dividing_the_channels_list_the_divisors():
    with pytest.raises(ConfigError, match=r"subquantizers: 3 does not divide the 2 channels.*"
                                          r"2x4x4.*\[1, 2\]"):  # fmt: skip
        build({**REMIND, "subquantizers": 3})


def test_missing_split_point_lists_the_model_s_split_points():
    with pytest.raises(ConfigError, match=r"no split point 'layer4.1'.*are block1, latent, head, "
                                          r"classifier"):  # fmt: skip
        build({**REMIND, "split": "layer4.1"})


def test_base_experience_too_small_for_the_codebook_is_refused():
    # One base class of ~135 images x 16 locations = ~2,200 latent vectors < 2**12 centroids.
    small_base = {"name": "split_digits", "n_experiences": 10}
    with pytest.raises(ConfigError, match=r"bits: .* latent vectors .* fewer than the 2\*\*12"):
        build({**REMIND, "bits": 12, "bytes": 100_000}, stream=small_base)


def test_streaming_needs_one_epoch_and_mixup_needs_one_task():
    with pytest.raises(ConfigError, match=r"streaming.*train.epochs to 1, got 3"):
        build({**REMIND, "streaming": True}, train={**TRAIN, "epochs": 3})
    with pytest.raises(ConfigError, match=r"mixup_alpha.*task-incremental"):
        build({**REMIND, "mixup_alpha": 0.1}, stream={**BASE_STREAM, "task_labels": True})


def test_task_incremental_stream_trains_with_masked_outputs():
    stream, remind = build(REMIND, stream={**BASE_STREAM, "task_labels": True})
    for experience in stream:
        remind.train(experience)
    assert np.mean(score_stream(remind, stream)[0]) > 0.5
