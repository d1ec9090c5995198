"""Networks for image streams: the MLP with dropout, the multi-head MLP, SimpleCNN, GEM's
reduced ResNet-18 and the CIFAR ResNet-32, on uint8 pixels as image streams hold them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from forgetless.core.schema import ConfigError, parse
from forgetless.models import build_model, model_factory, split_points
from forgetless.streams import Experience, Samples, Stream, build_stream
from forgetless.streams.digits import SplitDigitsConfig


def image_stream(shape=(3, 32, 32), classes=10, n=8, task_classes=None) -> Stream:
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8)
    y = torch.arange(n) % classes
    task = None if task_classes is None else torch.zeros_like(y)
    experience = Experience(0, "e", Samples(x, y, task), Samples(x, y, task))
    scenario = "class" if task_classes is None else "task"
    return Stream("images", scenario, [experience], classes, shape, task_classes)


def model(name: str, stream: Stream, **params) -> nn.Module:
    import typing

    config = typing.get_type_hints(model_factory(name, "model"))["config"]
    torch.manual_seed(0)
    return build_model(name, parse(config, params, "model"), stream)


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_mlp_dropout_adds_dropout_and_keeps_the_weights_names_without_it():
    stream = image_stream((1, 28, 28))
    plain, dropped = model("mlp", stream, hidden=[64, 32]), model("mlp", stream, hidden=[64, 32],
                                                                   dropout=0.5)  # fmt: skip
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert sum(isinstance(m, nn.Dropout) for m in dropped.modules()) == 2
    assert list(plain.state_dict()) == ["1.weight", "1.bias", "3.weight", "3.bias",
                                        "5.weight", "5.bias"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"model\.dropout: must be in \[0, 1\)"):
        model("mlp", stream, dropout=1.0)


def task_stream() -> Stream:
    return build_stream("split_digits", SplitDigitsConfig(n_experiences=5, task_labels=True), 0)


def test_multihead_mlp_has_one_head_per_task_over_its_classes():
    stream = task_stream()
    net = model("mlp_multihead", stream, hidden=[32])
    assert [h.out_features for h in net.heads] == [2] * 5
    x = stream.experiences[0].test.x[:4]
    out = net(x)
    h = net.features(x)
    for head, classes in zip(net.heads, stream.task_classes):
        assert torch.allclose(out[:, classes], head(h))


def test_multihead_mlp_trains_only_the_head_of_the_batch_task():
    from forgetless.strategies import TrainConfig, strategy_class

    stream = task_stream()
    net = model("mlp_multihead", stream, hidden=[32])
    cls = strategy_class("naive", "strategy")
    strategy = cls(net, cls.Config(), TrainConfig(), stream)
    batch = stream.experiences[1].train.subset(torch.arange(8))
    strategy.loss(batch).backward()
    grads = [h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.heads]
    assert grads == [False, True, False, False, False]


def test_multihead_mlp_masks_other_heads_when_avalanche_passes_task_labels():
    from avalanche.models.utils import avalanche_forward, is_multi_task_module

    stream = task_stream()
    net = model("mlp_multihead", stream, hidden=[32])
    assert is_multi_task_module(net)
    x = stream.experiences[2].test.x[:3]
    out = avalanche_forward(net, x, torch.tensor([2, 2, 0]))
    mine = torch.zeros(3, 10, dtype=torch.bool)
    mine[:2, stream.task_classes[2]] = True
    mine[2, stream.task_classes[0]] = True
    assert torch.allclose(out[mine], net(x)[mine])
    assert (out[~mine] < -1e8).all()


def test_multihead_mlp_needs_task_labels():
    with pytest.raises(ConfigError, match="no task labels.*scenario: task"):
        model("mlp_multihead", image_stream((1, 28, 28)))


@pytest.mark.parametrize(
    "name, params, shape, features",
    [
        ("simple_cnn", {}, (3, 32, 32), 64),
        ("simple_cnn", {}, (1, 28, 28), 64),
        ("reduced_resnet18", {}, (3, 32, 32), 160),
        ("reduced_resnet18", {"nf": 8}, (1, 28, 28), 64),
        ("resnet32", {}, (3, 32, 32), 64),
        ("resnet32", {"depth": 20}, (3, 32, 32), 64),
    ],
)
def test_conv_nets_read_uint8_images_into_their_classifier(name, params, shape, features):
    stream = image_stream(shape, classes=7)
    net = model(name, stream, **params).eval()
    x = stream.experiences[0].train.x
    out = net(x)
    assert out.shape == (len(x), 7) and out.dtype == torch.float32
    assert torch.allclose(out, net(x.float() / 255), atol=1e-5)
    assert list(net.children())[-1].in_features == features


def test_reduced_resnet18_and_resnet32_have_their_published_sizes():
    stream = image_stream(classes=100)
    # GEM's reduced ResNet-18 (nf=20) on CIFAR-100: about 1.1 M parameters.
    assert 1.0e6 < parameters(model("reduced_resnet18", stream)) < 1.3e6
    # He et al.'s ResNet-32 on CIFAR-10: 0.46 M (option A); option B's 1x1 shortcuts add ~0.01 M.
    assert 0.46e6 < parameters(model("resnet32", image_stream(classes=10))) < 0.48e6
    for name in ("reduced_resnet18", "resnet32"):
        assert {"layer2", "layer3", "pool", "fc"} <= set(split_points(model(name, stream)))
    with pytest.raises(ConfigError, match=r"model\.depth: must be 6n \+ 2"):
        model("resnet32", stream, depth=30)
