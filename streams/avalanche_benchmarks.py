"""avalanche-lib benchmarks as forgetless streams: `avalanche.SplitMNIST`, `avalanche.SplitCIFAR10`.

The benchmark is built by avalanche-lib from a local `data_root` and its experiences
are materialised as tensors with the benchmark's evaluation transform (training-time
augmentation is not applied). Nothing downloads: missing data is an error that names
the path and how to get it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgetless.core.schema import ConfigError, param, positive, suggest
from forgetless.streams.base import Experience, Samples, Stream

PREFIX = "avalanche."
# Benchmarks whose data torchvision can check on disk, and the torchvision class that reads it.
TORCHVISION_DATA = {
    "SplitMNIST": "MNIST",
    "PermutedMNIST": "MNIST",
    "RotatedMNIST": "MNIST",
    "SplitFMNIST": "FashionMNIST",
    "SplitCIFAR10": "CIFAR10",
    "SplitCIFAR100": "CIFAR100",
}
SCENARIOS = {"PermutedMNIST": "domain", "RotatedMNIST": "domain"}


@dataclass
class AvalancheBenchmarkConfig:
    data_root: str = param(help="folder holding the dataset (nothing is downloaded)")
    n_experiences: int = param(5, "number of experiences")
    options: dict[str, Any] = param({}, "further keyword arguments of the avalanche benchmark")

    def validate(self, where: str) -> None:
        positive(self.n_experiences, f"{where}.n_experiences")
        for key in ("download", "dataset_root", "seed", "n_experiences"):
            if key in self.options:
                raise ConfigError(f"{where}.options.{key}: set by forgetless; remove it")


def check_on_disk(benchmark: str, data_root: str, where: str) -> None:
    """Raise ConfigError naming the path unless torchvision finds the dataset there."""
    dataset = TORCHVISION_DATA.get(benchmark)
    root = Path(data_root).expanduser()
    if dataset is None:
        if not root.is_dir():
            raise ConfigError(f"{where}.data_root: {str(root)!r} is not a folder")
        return
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, dataset)(str(root), train=True, download=False)
    except RuntimeError as e:
        raise ConfigError(
            f"{where}.data_root: {dataset} not found under {str(root)!r} ({e}). Nothing is "
            f'downloaded at run time: on a machine with internet run `python -c "import '
            f"torchvision; torchvision.datasets.{dataset}('{root}', download=True)\"` and copy "
            f"the folder here, or point data_root at an existing copy"
        ) from e


@functools.cache
def avalanche_stream_factory(name: str, where: str):
    """The stream factory for `avalanche.<Benchmark>`."""
    import avalanche.benchmarks.classic as classic

    benchmark_name = name[len(PREFIX) :]
    benchmark_cls = getattr(classic, benchmark_name, None)
    if benchmark_cls is None or not benchmark_name[:1].isupper():
        known = [n for n in dir(classic) if n[:1].isupper()]
        raise ConfigError(
            f"{where}: avalanche-lib has no benchmark {benchmark_name!r}"
            f"{suggest(benchmark_name, known)}; known: {', '.join(known)}"
        )

    @dataclass
    class Config(AvalancheBenchmarkConfig):
        def validate(self, where: str) -> None:
            super().validate(where)
            check_on_disk(benchmark_name, self.data_root, where)

    def factory(config: Config, seed: int) -> Stream:
        check_on_disk(benchmark_name, config.data_root, name)  # again: the data may have moved
        benchmark = benchmark_cls(
            n_experiences=config.n_experiences,
            seed=seed,
            dataset_root=str(Path(config.data_root).expanduser()),
            **config.options,
        )
        experiences = []
        pairs = zip(benchmark.train_stream, benchmark.test_stream)
        for i, (train_exp, test_exp) in enumerate(pairs):
            classes = sorted(int(c) for c in train_exp.classes_in_this_experience)
            train, test = _tensors(train_exp.dataset), _tensors(test_exp.dataset)
            experiences.append(Experience(i, f"exp_{i}", train, test, info={"classes": classes}))
        return Stream(
            name=name,
            scenario=SCENARIOS.get(benchmark_name, "class"),
            experiences=experiences,
            num_classes=benchmark.n_classes,
            input_shape=tuple(experiences[0].train.x.shape[1:]),
        )

    factory.__annotations__ = {"config": Config, "seed": int, "return": Stream}
    factory.kind = "classification"
    return factory


def _tensors(dataset) -> Samples:
    loader = torch.utils.data.DataLoader(dataset.eval(), batch_size=1024)
    xs, ys = [], []
    for batch in loader:
        xs.append(batch[0])
        ys.append(batch[1])
    return Samples(torch.cat(xs), torch.cat(ys).long())
