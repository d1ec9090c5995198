"""Avalanche's published baselines on real MNIST, run through forgetless and timed against
plain avalanche-lib.

ContinualAI/continual-learning-baselines lists a target accuracy per (strategy, benchmark)
in tests/target_results.csv and the settings in experiments/split_mnist/ and
experiments/permuted_mnist/. The grids in grids/baselines/ copy those settings; this
script runs each grid (3 seeds) with the local runner into a temporary MLflow store and
reads final/avg_acc, the mean over experiences of the accuracy after the last one (the
baselines read avalanche's stream accuracy, the same figure weighted by test-set size:
equal on permuted MNIST, within a fraction of a point on split MNIST).

Then it runs each row once more (seed 0) in plain avalanche-lib, with its own loop as the
baselines repository writes it: avalanche's classic SplitMNIST / PermutedMNIST benchmark
(torchvision's MNIST reader, per-sample PIL transforms, normalised as avalanche does) read
from the same images written in torchvision's raw layout to a temporary folder, avalanche's
SimpleMLP or a multi-head MLP, `strategy.train(experience)` per experience. Seconds are
training time only (evaluation is excluded on both sides): forgetless' `final/train_time_s`
averaged over seeds, and the sum of avalanche's `train` calls.

The rehearsal reference row runs avalanche-lib's Replay with the same memory (500) and
setting; `rehearsal_vs_avalanche_replay_speedup` is its time over forgetless rehearsal's.

Run: `.venv/bin/python benchmarks/baselines.py`; `--rows` picks some. Every run (each seed
of each row, and each plain avalanche-lib run) is a one-core task of a local Ray cluster
with `--workers` of them at once, one per core by default, as `forgetless run` schedules
cells; `--workers 1` runs them one after another in this process. `--smoke` runs every
row at toy sizes in about a minute: its figures measure nothing. The last line printed is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from torch import nn

from forgetless.experiments.cluster import connect, ray_executor
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import local_executor, run_grid

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ROOT / "grids" / "baselines"
# (row name, grid file, strategy in the grid, target from tests/target_results.csv)
ROWS = [
    ("si_split_mnist_task", "si_split_mnist.yaml", "avalanche.SynapticIntelligence", 0.97),
    ("gdumb_split_mnist_class", "gdumb_split_mnist.yaml", "avalanche.GDumb", 0.97),
    ("naive_split_mnist_class", "reference_split_mnist.yaml", "naive", None),
    ("cumulative_split_mnist_class", "reference_split_mnist.yaml", "cumulative", None),
    ("rehearsal_split_mnist_class", "reference_split_mnist.yaml", "rehearsal", None),
    ("ewc_permuted_mnist", "ewc_permuted_mnist.yaml", "avalanche.EWC", 0.83),
    ("si_permuted_mnist", "si_permuted_mnist.yaml", "avalanche.SynapticIntelligence", 0.83),
    ("agem_permuted_mnist", "agem_permuted_mnist.yaml", "avalanche.AGEM", 0.81),
]
# The avalanche-lib class of each forgetless reference strategy, for the plain run.
NATIVE = {"naive": ("Naive", {}), "cumulative": ("Cumulative", {}),
          "rehearsal": ("Replay", {"mem_size": 500})}  # fmt: skip


def grid_data(file: str, strategy: str, smoke: bool, seeds: list[int], storage: str) -> dict:
    """The grid of `file` with only `strategy`, at toy sizes with --smoke."""
    data = yaml.safe_load((GRIDS / file).read_text())
    data["strategies"] = [s for s in data["strategies"] if _name(s) == strategy]
    data["seeds"], data["storage"] = seeds, storage
    data["name"] = f"{data['name']}-{strategy.replace('avalanche.', '').lower()}"
    if smoke:
        stream = data["streams"][0]
        stream.update(max_train=64, max_test=64)
        if stream["name"] == "permuted_mnist":
            stream["n_experiences"] = 2
        data["train"]["epochs"] = 1
        for s in data["strategies"]:
            if isinstance(s, dict):
                for key, small in (("mem_size", 40), ("patterns_per_exp", 8), ("sample_size", 8)):
                    if key in s:
                        s[key] = small
                if "buffer" in s:
                    s["buffer"]["size"] = 40
    return data


def _name(spec) -> str:
    return spec if isinstance(spec, str) else spec["name"]


def run_forgetless(data: dict, uri: str, workers: int) -> tuple[list[float], list[float]]:
    """(final/avg_acc per seed, train seconds per seed), in the grid's seed order; with
    several workers, the seeds are cells of a local Ray cluster, one core each, as
    `forgetless run` schedules them."""
    grid = grid_from_dict(data)
    executor = ray_executor(grid.resources, len(grid.cells)) if workers > 1 else local_executor
    order = {cell.hash: i for i, cell in enumerate(grid.cells)}
    outcomes = sorted(run_grid(grid, uri, executor), key=lambda o: order[o.cell_hash])
    failed = [o.error for o in outcomes if o.status != "FINISHED"]
    if failed:
        raise RuntimeError(f"{data['name']}: {failed}")
    return ([o.summary["avg_acc"] for o in outcomes],
            [o.summary["train_time_s"] for o in outcomes])  # fmt: skip


# --- plain avalanche-lib ---------------------------------------------------------------------


def write_torchvision_mnist(folder: Path, smoke: bool) -> str:
    """The MNIST that forgetless reads, written as torchvision's raw layout (with --smoke,
    its first 640 training and 200 test images)."""
    from forgetless.streams.mnist import IDX_FILES, load, write_idx

    data = load("mnist")
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, samples in (("train", data.train), ("test", data.test)):
        n = (640 if split == "train" else 200) if smoke else len(samples)
        images, labels = IDX_FILES[split]
        write_idx(raw / images, samples.x[:n, 0].numpy())
        write_idx(raw / labels, samples.y[:n].numpy().astype("uint8"))
    return str(folder)


def multihead_mlp(hidden: list[int]) -> nn.Module:
    """A shared MLP and avalanche's MultiHeadClassifier, as the baselines' MultiHeadMLP."""
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    class MultiHeadMLP(MultiTaskModule):
        def __init__(self):
            super().__init__()
            layers, width = [nn.Flatten()], 28 * 28
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            self.features = nn.Sequential(*layers)
            self.classifier = MultiHeadClassifier(width)

        def forward_single_task(self, x, task_label):
            return self.classifier(self.features(x), task_label)

    return MultiHeadMLP()


def run_avalanche(data: dict, root: str, threads: int = 1) -> tuple[float, float]:
    """(average accuracy over experiences, train seconds) of the row in plain avalanche-lib,
    seed 0, with its own loop."""
    import avalanche.training as training
    from avalanche.benchmarks.classic import PermutedMNIST, SplitMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training.plugins import EvaluationPlugin

    stream, train, model_spec = data["streams"][0], data["train"], data["model"]
    (spec,) = data["strategies"]
    name = _name(spec)
    params = {k: v for k, v in spec.items() if k not in ("name", "buffer")} if isinstance(
        spec, dict) else {}  # fmt: skip
    if name in NATIVE:
        name, params = NATIVE[name][0], {**NATIVE[name][1]}
        if isinstance(spec, dict) and "buffer" in spec:
            params["mem_size"] = spec["buffer"]["size"]
    else:
        name = name.removeprefix("avalanche.")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if stream["name"] == "permuted_mnist":
        benchmark = PermutedMNIST(stream["n_experiences"], seed=0, dataset_root=root)
    else:
        benchmark = SplitMNIST(
            stream["n_experiences"], seed=0, dataset_root=root,
            return_task_id=stream.get("scenario") == "task",
            fixed_class_order=stream.get("fixed_class_order"),
        )  # fmt: skip
    hidden = model_spec["hidden"]
    if model_spec["name"] == "mlp_multihead":
        model = multihead_mlp(hidden)
    else:
        model = SimpleMLP(num_classes=10, hidden_size=hidden[0], hidden_layers=len(hidden),
                          drop_rate=model_spec.get("dropout", 0.0))  # fmt: skip
        assert len(set(hidden)) == 1, "SimpleMLP has equal hidden widths"
    optimizer_cls = torch.optim.Adam if train["optimizer"] == "adam" else torch.optim.SGD
    strategy = getattr(training, name)(
        model, optimizer_cls(model.parameters(), lr=train["lr"]), nn.CrossEntropyLoss(),
        train_mb_size=train["batch_size"], train_epochs=train["epochs"], eval_mb_size=512,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]), **params,
    )  # fmt: skip
    seconds = 0.0
    for experience in benchmark.train_stream:
        start = time.perf_counter()
        strategy.train(experience, num_workers=0)
        seconds += time.perf_counter() - start
    results = strategy.eval(benchmark.test_stream)
    per_experience = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp/eval_phase")]
    return statistics.fmean(per_experience), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the path only")
    parser.add_argument("--rows", nargs="*", help="run only these rows (names as printed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds run")
    parser.add_argument("--no-avalanche", action="store_true", help="skip the plain runs")
    parser.add_argument(
        "--only-avalanche", action="store_true", help="only the plain runs (seed 0)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1,
        help="runs at once, one core each, on a local Ray cluster (default: one per core; "
        "1: everything in this process, one after another)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.no_avalanche and args.only_avalanche:
        parser.error("--no-avalanche and --only-avalanche leave nothing to run")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    seeds = [0] if args.smoke else args.seeds
    unknown = set(args.rows or ()) - {r[0] for r in ROWS}
    if unknown:
        parser.error(f"--rows: no row {sorted(unknown)}; the rows: {[r[0] for r in ROWS]}")
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows]
    if args.workers > 1:
        connect(None)
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        mnist_root = None
        if not args.no_avalanche:
            mnist_root = write_torchvision_mnist(Path(folder, "mnist"), args.smoke)
        datas = [grid_data(file, strategy, args.smoke, seeds, f"{folder}/runs")
                 for _, file, strategy, _ in rows]  # fmt: skip
        # Every run is a task for the pool: the rows' grids (one thread each hands its cells
        # to Ray) and the plain avalanche-lib runs, so that no core waits for a row to end.
        with ThreadPoolExecutor(2 * len(rows)) as pool:
            ours = [pool.submit(run_forgetless, data, uri, args.workers)
                    if not args.only_avalanche else None for data in datas]  # fmt: skip
            plain = [pool.submit(plain_run, data, mnist_root, args.workers, args.threads)
                     if mnist_root else None for data in datas]  # fmt: skip
            out = []
            for (name, _, _, target), mine, theirs in zip(rows, ours, plain):
                accs, times = mine.result() if mine is not None else ([], [])
                row = {
                    "name": name, "target": target,
                    "mean": statistics.fmean(accs) if accs else None,
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seconds": statistics.fmean(times) if times else None,
                    "avalanche_seconds": None, "avalanche_acc": None, "seeds": len(accs),
                    "per_seed": dict(zip(map(str, seeds), accs)),
                }  # fmt: skip
                if theirs is not None:
                    row["avalanche_acc"], row["avalanche_seconds"] = theirs.result()
                print(f"{name}: {json.dumps(row)}", file=sys.stderr, flush=True)
                out.append(row)
    rehearsal = next((r for r in out if r["name"] == "rehearsal_split_mnist_class"), None)
    speedup = None
    if rehearsal and rehearsal["avalanche_seconds"] and rehearsal["seconds"]:
        speedup = rehearsal["avalanche_seconds"] / rehearsal["seconds"]
    print(json.dumps({"rows": out, "rehearsal_vs_avalanche_replay_speedup": speedup,
                      "workers": args.workers, "smoke": args.smoke}))  # fmt: skip
    return 0


def plain_run(data: dict, root: str, workers: int, threads: int) -> tuple[float, float]:
    """run_avalanche here, or with several workers as a one-core task of the Ray pool."""
    if workers <= 1:
        return run_avalanche(data, root, threads)
    import ray

    task = ray.remote(num_cpus=1)(run_avalanche)
    return ray.get(task.remote(data, root, threads))


if __name__ == "__main__":
    sys.exit(main())
