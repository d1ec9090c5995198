"""Training overhead of forgetless against a bare PyTorch loop and avalanche-lib.

On split_digits (5 experiences, seed 0), one MLP (hidden [128]), SGD lr 0.05 momentum
0.9, 5 epochs, batch size 32 and one CPU thread for everyone, this times in one run:

  bare_naive      a plain PyTorch loop: tensors, randperm, sliced batches, step
  bare_replay     the same plus a reservoir buffer of 200 and 32 replayed samples
                  appended to every step after the first experience
  fl_naive        forgetless `naive`, built as users build it (grid_from_dict + build_cell)
  fl_rehearsal    forgetless `rehearsal` (reservoir buffer of 200, replay batch 32)
  av_naive        avalanche.training.Naive on an avalanche benchmark of the same tensors
  av_replay       avalanche.training.Replay(mem_size=200)

Training time is measured around the training of each experience only; evaluation
(scoring every test set after each experience) is timed separately. Systems run
interleaved, ROUNDS rounds in rotating order, and every figure is a median over rounds
(this machine is small and noisy); ratios come from the medians of the same run.

Then real cells run through `runner.run_cell` into a temporary SQLite MLflow store,
with the tracker's calls timed, to give the share of a cell's wall time spent logging.

Run: `.venv/bin/python benchmarks/overhead.py`. The last line is one JSON object.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from forgetless.experiments import checkpoint, plots, tracking
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import score_stream
from forgetless.experiments.runner import build_cell, run_cell
from forgetless.models import MLPConfig, build_model
from forgetless.streams import Stream
from torch import nn

SEED = 0
EPOCHS = 5
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
EVAL_BATCH_SIZE = 512
HIDDEN = [128]
MEM_SIZE = 200
ROUNDS = 5
MLFLOW_CELLS = 4  # cells per strategy; the first (cold: imports, engine) is reported apart

TARGET_FL_VS_BARE = 1.15
TARGET_AV_VS_FL = 3.0
TARGET_MLFLOW_SHARE = 0.05

GRID = {
    "name": "overhead",
    "seeds": [SEED],
    "streams": [{"name": "split_digits", "n_experiences": 5}],
    "model": {"name": "mlp", "hidden": HIDDEN},
    "train": {
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "lr": LR,
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "eval_batch_size": EVAL_BATCH_SIZE,
    },
    "strategies": [
        "naive",
        {"name": "rehearsal", "buffer": {"size": MEM_SIZE, "policy": "reservoir"}},
    ],
}

Timings = tuple[float, float, list[float]]  # train seconds, eval seconds, final accuracies


def cells_by_strategy(grid_dict: dict) -> dict:
    return {c.strategy: c for c in grid_from_dict(grid_dict).cells}


CELLS = cells_by_strategy(GRID)


def fresh_model(stream: Stream) -> nn.Module:
    """The MLP exactly as forgetless builds it, after the same seeding as a cell."""
    checkpoint.seed_everything(SEED)
    return build_model("mlp", MLPConfig(hidden=list(HIDDEN)), stream)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


# --- (a) bare PyTorch ----------------------------------------------------------------


@torch.no_grad()
def bare_scores(model: nn.Module, stream: Stream) -> list[float]:
    model.eval()
    scores = []
    for e in stream:
        x, y = e.test.x, e.test.y
        correct = 0
        for s in range(0, len(y), EVAL_BATCH_SIZE):
            correct += (
                model(x[s : s + EVAL_BATCH_SIZE]).argmax(1) == y[s : s + EVAL_BATCH_SIZE]
            ).sum()
        scores.append(int(correct) / len(y))
    model.train()
    return scores


def run_bare(stream: Stream, replay: bool) -> Timings:
    """The loop a user would write by hand.

    With replay=True it also keeps a reservoir buffer of MEM_SIZE samples and appends
    BATCH_SIZE replayed samples to every step once the buffer is non-empty, which is what
    forgetless `rehearsal` does, so `rehearsal_vs_bare` compares like with like (and
    `naive_vs_bare` compares forgetless naive with the loop without replay).
    """
    model = fresh_model(stream)
    optimizer = sgd(model)
    buf_x = buf_y = None
    seen = 0
    train_s = eval_s = 0.0
    scores: list[float] = []
    for e in stream:
        tick = time.perf_counter()
        x, y = e.train.x, e.train.y
        n = len(y)
        model.train()
        for _ in range(EPOCHS):
            order = torch.randperm(n)
            for s in range(0, n, BATCH_SIZE):
                idx = order[s : s + BATCH_SIZE]
                xb, yb = x[idx], y[idx]
                if replay and buf_x is not None:
                    r = torch.randint(len(buf_y), (BATCH_SIZE,))
                    xb, yb = torch.cat([xb, buf_x[r]]), torch.cat([yb, buf_y[r]])
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if replay:  # reservoir sampling (Vitter's algorithm R), sample by sample
            for i in range(n):
                if buf_y is None or len(buf_y) < MEM_SIZE:
                    buf_x = (
                        x[i : i + 1].clone() if buf_x is None else torch.cat([buf_x, x[i : i + 1]])
                    )
                    buf_y = (
                        y[i : i + 1].clone() if buf_y is None else torch.cat([buf_y, y[i : i + 1]])
                    )
                else:
                    j = int(torch.randint(seen + 1, ()))
                    if j < MEM_SIZE:
                        buf_x[j], buf_y[j] = x[i], y[i]
                seen += 1
        tock = time.perf_counter()
        scores = bare_scores(model, stream)
        train_s += tock - tick
        eval_s += time.perf_counter() - tock
    return train_s, eval_s, scores


# --- (b) forgetless --------------------------------------------------------------------


def run_forgetless(strategy_name: str) -> Timings:
    stream, strategy = build_cell(CELLS[strategy_name], "cpu")
    train_s = eval_s = 0.0
    scores: list[float] = []
    for e in stream:
        tick = time.perf_counter()
        strategy.train(e)
        tock = time.perf_counter()
        scores = score_stream(strategy, stream)
        train_s += tock - tick
        eval_s += time.perf_counter() - tock
    return train_s, eval_s, scores


# --- (c) avalanche-lib -----------------------------------------------------------------


def as_avalanche(samples):
    """A tensor dataset the way strategies/avalanche_adapter.py builds one."""
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    task = samples.task if samples.task is not None else torch.zeros_like(samples.y)
    return _make_taskaware_tensor_classification_dataset(
        samples.x, samples.y, targets=samples.y.tolist(), task_labels=task.tolist()
    )


@functools.cache
def avalanche_benchmark():
    from avalanche.benchmarks.scenarios import benchmark_from_datasets

    stream, _ = build_cell(CELLS["naive"], "cpu")
    benchmark = benchmark_from_datasets(
        train=[as_avalanche(e.train) for e in stream], test=[as_avalanche(e.test) for e in stream]
    )
    return stream, benchmark


def run_avalanche(name: str) -> Timings:
    from avalanche.training import Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    stream, benchmark = avalanche_benchmark()
    model = fresh_model(stream)
    common = dict(
        model=model,
        optimizer=sgd(model),
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=BATCH_SIZE,
        train_epochs=EPOCHS,
        eval_mb_size=EVAL_BATCH_SIZE,
        device="cpu",
        evaluator=EvaluationPlugin(loggers=[]),
    )
    strategy = Naive(**common) if name == "naive" else Replay(mem_size=MEM_SIZE, **common)
    train_s = eval_s = 0.0
    for experience in benchmark.train_stream:
        tick = time.perf_counter()
        strategy.train(experience, num_workers=0)
        tock = time.perf_counter()
        strategy.eval(benchmark.test_stream, num_workers=0)
        train_s += tock - tick
        eval_s += time.perf_counter() - tock
    # Scored outside the timers, the same way as the bare loop, as a sanity check.
    return train_s, eval_s, bare_scores(model, stream)


SYSTEMS: dict[str, Callable[[], Timings]] = {
    "bare_naive": lambda: run_bare(avalanche_benchmark()[0], replay=False),
    "bare_replay": lambda: run_bare(avalanche_benchmark()[0], replay=True),
    "fl_naive": lambda: run_forgetless("naive"),
    "fl_rehearsal": lambda: run_forgetless("rehearsal"),
    "av_naive": lambda: run_avalanche("naive"),
    "av_replay": lambda: run_avalanche("replay"),
}


def time_systems() -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, float]]:
    names = list(SYSTEMS)
    train: dict[str, list[float]] = {n: [] for n in names}
    evals: dict[str, list[float]] = {n: [] for n in names}
    final_acc: dict[str, float] = {}
    for r in range(ROUNDS):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            t, e, scores = SYSTEMS[name]()
            train[name].append(t)
            evals[name].append(e)
            final_acc[name] = sum(scores) / len(scores)
        print(f"round {r + 1}/{ROUNDS} done", file=sys.stderr)
    return train, evals, final_acc


# --- MLflow share ------------------------------------------------------------------------


class Stopwatch:
    """Accumulates time spent inside wrapped callables; nested wrapped calls count once."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}
        self.depth = 0

    def wrap(self, owner, attr: str, bucket: str) -> None:
        raw = owner.__dict__[attr]
        is_classmethod = isinstance(raw, classmethod)
        fn = raw.__func__ if is_classmethod else raw

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[bucket] = self.total.get(bucket, 0.0) + time.perf_counter() - tick
                self.depth -= 1

        setattr(owner, attr, classmethod(timed) if is_classmethod else timed)


def measure_mlflow() -> dict[str, dict[str, float]]:
    """Real cells through run_cell into a temporary SQLite store, tracker calls timed."""
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    watch = Stopwatch()
    for method in ("start", "resume", "log_step", "finish", "fail"):
        watch.wrap(tracking.CellRun, method, "mlflow")
    watch.wrap(MlflowClient, "set_tag", "mlflow")  # the runner's untrained-experience warning
    watch.wrap(checkpoint, "save", "checkpoint")
    watch.wrap(plots, "accuracy_heatmap", "figure")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="forgetless-overhead-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        grid_run = tracking.open_grid(uri, GRID["name"], 2 * MLFLOW_CELLS, GRID)
        per: dict[str, list[dict[str, float]]] = {"naive": [], "rehearsal": []}
        for k in range(MLFLOW_CELLS):
            for name in ("naive", "rehearsal") if k % 2 == 0 else ("rehearsal", "naive"):
                watch.total = {}
                gc.collect()
                tick = time.perf_counter()
                # A fresh storage folder each time, or run_cell would resume the finished cell.
                outcome = run_cell(CELLS[name], grid_run, str(Path(tmp) / f"runs{k}"), "cpu")
                wall = time.perf_counter() - tick
                if outcome.status != "FINISHED":
                    raise RuntimeError(f"{outcome.label}: {outcome.error}")
                per[name].append({"wall_s": wall, **watch.total})
        for name, rows in per.items():
            warm = rows[1:]

            def med(key: str, rows=warm) -> float:
                return statistics.median(r.get(key, 0.0) for r in rows)

            wall = med("wall_s")
            results[name] = {
                "wall_s": wall,
                "mlflow_s": med("mlflow"),
                "checkpoint_s": med("checkpoint"),
                "figure_s": med("figure"),
                "share": statistics.median(r.get("mlflow", 0.0) / r["wall_s"] for r in warm),
                "checkpoint_share": statistics.median(
                    r.get("checkpoint", 0.0) / r["wall_s"] for r in warm
                ),
                "cold_wall_s": rows[0]["wall_s"],
                "cold_share": rows[0].get("mlflow", 0.0) / rows[0]["wall_s"],
            }
    return results


def main() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    train, evals, final_acc = time_systems()
    med = {n: statistics.median(v) for n, v in train.items()}
    med_eval = {n: statistics.median(v) for n, v in evals.items()}
    mlflow = measure_mlflow()

    ratios = {
        "naive_vs_bare": med["fl_naive"] / med["bare_naive"],
        "rehearsal_vs_bare": med["fl_rehearsal"] / med["bare_replay"],
        "avalanche_naive_vs_forgetless": med["av_naive"] / med["fl_naive"],
        "avalanche_replay_vs_forgetless": med["av_replay"] / med["fl_rehearsal"],
        "avalanche_naive_vs_bare": med["av_naive"] / med["bare_naive"],
        "avalanche_replay_vs_bare": med["av_replay"] / med["bare_replay"],
        "mlflow_share": max(m["share"] for m in mlflow.values()),
    }
    targets = {
        "naive_within_target": ratios["naive_vs_bare"] <= TARGET_FL_VS_BARE,
        "rehearsal_within_target": ratios["rehearsal_vs_bare"] <= TARGET_FL_VS_BARE,
        "avalanche_naive_slower_target": ratios["avalanche_naive_vs_forgetless"] >= TARGET_AV_VS_FL,
        "avalanche_replay_slower_target": ratios["avalanche_replay_vs_forgetless"]
        >= TARGET_AV_VS_FL,
        "mlflow_share_target": ratios["mlflow_share"] <= TARGET_MLFLOW_SHARE,
    }

    out = sys.stderr
    print(
        f"\nsplit_digits x5, mlp {HIDDEN}, sgd lr={LR} momentum={MOMENTUM}, epochs={EPOCHS}, "
        f"batch={BATCH_SIZE}, 1 thread; medians of {ROUNDS} interleaved rounds",
        file=out,
    )
    print(
        f"{'system':<14}{'train s':>10}{'min':>9}{'max':>9}{'eval s':>9}{'final acc':>11}", file=out
    )
    for n in SYSTEMS:
        print(
            f"{n:<14}{med[n]:>10.3f}{min(train[n]):>9.3f}{max(train[n]):>9.3f}"
            f"{med_eval[n]:>9.3f}{final_acc[n]:>11.3f}",
            file=out,
        )
    print("\nratios (training time, from the medians above)", file=out)
    for k, v in ratios.items():
        if k != "mlflow_share":
            print(f"  {k:<32}{v:>7.2f}", file=out)
    print(f"\nMLflow (run_cell into SQLite; medians of {MLFLOW_CELLS - 1} warm cells)", file=out)
    print(
        f"{'cell':<11}{'wall s':>9}{'mlflow s':>10}{'share':>8}{'ckpt s':>9}{'figure s':>10}"
        f"{'cold wall':>11}{'cold share':>12}",
        file=out,
    )
    for n, m in mlflow.items():
        print(
            f"{n:<11}{m['wall_s']:>9.3f}{m['mlflow_s']:>10.3f}{m['share']:>8.1%}"
            f"{m['checkpoint_s']:>9.3f}{m['figure_s']:>10.3f}{m['cold_wall_s']:>11.3f}"
            f"{m['cold_share']:>12.1%}",
            file=out,
        )
    print(f"\ntargets: {targets}\ntotal {time.perf_counter() - started:.0f} s", file=out)

    result = {
        **ratios,
        "train_s": med,
        "eval_s": med_eval,
        "train_s_all": train,
        "final_avg_acc": final_acc,
        "mlflow": mlflow,
        "targets": {
            "forgetless_vs_bare_max": TARGET_FL_VS_BARE,
            "avalanche_vs_forgetless_min": TARGET_AV_VS_FL,
            "mlflow_share_max": TARGET_MLFLOW_SHARE,
        },
        **targets,
        "config": {
            "stream": "split_digits",
            "n_experiences": 5,
            "seed": SEED,
            "hidden": HIDDEN,
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "momentum": MOMENTUM,
            "mem_size": MEM_SIZE,
            "rounds": ROUNDS,
            "threads": 1,
            "torch": torch.__version__,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
