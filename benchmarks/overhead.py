"""Training overhead of forgetless against a bare PyTorch loop and avalanche-lib.

On split_digits (5 experiences, seed 0), one MLP (hidden [128]), SGD lr 0.05 momentum
0.9, 5 epochs, batch size 32, the same seed and one CPU thread for everyone, this times
in one run:

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
(this 2-core machine is noisy); ratios come from the medians of the same run. Beside
them, as cross-checks: ratios of each system's fastest run, and of the median CPU time of
this thread, which leaves out time the thread was preempted by other processes (but not
slow-downs from a busy neighbour on the same core, which inflate CPU time too).

Then real cells run through `runner.run_cell` into a temporary SQLite MLflow store, with
the tracker's calls timed, to give the share of a cell's wall time spent logging.

Run: `.venv/bin/python benchmarks/overhead.py`. The last line is one JSON object.
`--smoke` takes the same path at sizes that run in seconds (2 experiences, 1 epoch, 1
round, 2 MLflow cells per strategy), for tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from forgetless.experiments import checkpoint, plots, tracking
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import score_stream
from forgetless.experiments.runner import build_cell, run_cell
from forgetless.models import MLPConfig, build_model
from forgetless.streams import Stream

SEED = 0
EXPERIENCES = 5
EPOCHS = 5
BATCH_SIZE = 32
LR = 0.05
MOMENTUM = 0.9
EVAL_BATCH_SIZE = 512
HIDDEN = [128]
MEM_SIZE = 200
ROUNDS = 9
MLFLOW_CELLS = 4  # cells per strategy; the first (cold) is reported apart

TARGET_FL_VS_BARE = 1.15
TARGET_AV_VS_FL = 3.0
TARGET_MLFLOW_SHARE = 0.05

GRID = {
    "name": "overhead",
    "seeds": [SEED],
    "streams": [{"name": "split_digits", "n_experiences": EXPERIENCES}],
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
CELLS = {cell.strategy: cell for cell in grid_from_dict(GRID).cells}


def use_smoke_sizes() -> None:
    """--smoke: the fewest experiences, epochs, rounds and MLflow cells the code path takes
    (a median needs one round; the warm MLflow figures need a second cell)."""
    global EXPERIENCES, EPOCHS, ROUNDS, MLFLOW_CELLS, CELLS
    EXPERIENCES, EPOCHS, ROUNDS, MLFLOW_CELLS = 2, 1, 1, 2
    GRID["streams"][0]["n_experiences"] = EXPERIENCES
    GRID["train"]["epochs"] = EPOCHS
    CELLS = {cell.strategy: cell for cell in grid_from_dict(GRID).cells}


class Span:
    """Wall-clock and this thread's CPU time, accumulated over the `with` blocks it times."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Span:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.thread_time() - self._cpu


Timings = tuple[Span, Span, list[float]]  # training, evaluation, final accuracies


@functools.cache
def digits_stream() -> Stream:
    """The cells' stream (split_digits, seed 0), built as a cell builds it."""
    stream, _ = build_cell(CELLS["naive"], "cpu")
    return stream


def fresh_model(stream: Stream) -> nn.Module:
    """The MLP as forgetless builds it, after the same seeding as a cell."""
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
            logits = model(x[s : s + EVAL_BATCH_SIZE])
            correct += int((logits.argmax(1) == y[s : s + EVAL_BATCH_SIZE]).sum())
        scores.append(correct / len(y))
    model.train()
    return scores


def run_bare(replay: bool) -> Timings:
    """The loop a user would write by hand.

    With replay=True it also keeps a reservoir buffer of MEM_SIZE samples and appends
    BATCH_SIZE replayed samples to every step once the buffer holds any, which is what
    forgetless `rehearsal` does: `rehearsal_vs_bare` compares it with this loop (like
    with like), and `naive_vs_bare` compares forgetless naive with the loop without it.
    """
    stream = digits_stream()
    model = fresh_model(stream)
    optimizer = sgd(model)
    buf_x = buf_y = None
    seen = stored = 0
    training, evaluation = Span(), Span()
    scores: list[float] = []
    for e in stream:
        with training:
            x, y = e.train.x, e.train.y
            n = len(y)
            model.train()
            for _ in range(EPOCHS):
                order = torch.randperm(n)
                for s in range(0, n, BATCH_SIZE):
                    idx = order[s : s + BATCH_SIZE]
                    xb, yb = x[idx], y[idx]
                    if replay and stored:
                        r = torch.randint(stored, (BATCH_SIZE,))
                        xb, yb = torch.cat([xb, buf_x[r]]), torch.cat([yb, buf_y[r]])
                    loss = F.cross_entropy(model(xb), yb)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            if replay:  # reservoir sampling (Vitter's algorithm R) over this experience
                if buf_x is None:
                    buf_x, buf_y = x.new_empty((MEM_SIZE, *x.shape[1:])), y.new_empty(MEM_SIZE)
                u = torch.rand(n).tolist()
                target = {}  # slot -> sample; a later sample overwrites an earlier one
                for i in range(n):
                    slot = seen if seen < MEM_SIZE else int(u[i] * (seen + 1))
                    if slot < MEM_SIZE:
                        target[slot] = i
                    seen += 1
                slots, source = torch.tensor(list(target)), torch.tensor(list(target.values()))
                buf_x[slots], buf_y[slots] = x[source], y[source]
                stored = min(seen, MEM_SIZE)
        with evaluation:
            scores = bare_scores(model, stream)
    return training, evaluation, scores


# --- (b) forgetless --------------------------------------------------------------------


def run_forgetless(strategy_name: str) -> Timings:
    stream, strategy = build_cell(CELLS[strategy_name], "cpu")
    training, evaluation = Span(), Span()
    scores: list[float] = []
    for e in stream:
        with training:
            strategy.train(e)
        with evaluation:
            scores, _ = score_stream(strategy, stream)  # (R row, secondary scores)
    return training, evaluation, scores


# --- (c) avalanche-lib -----------------------------------------------------------------


def as_avalanche(samples):
    """A tensor dataset, built the way strategies/avalanche_adapter.py builds one."""
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset

    task = samples.task if samples.task is not None else torch.zeros_like(samples.y)
    return _make_taskaware_tensor_classification_dataset(
        samples.x, samples.y, targets=samples.y.tolist(), task_labels=task.tolist()
    )


@functools.cache
def avalanche_benchmark():
    from avalanche.benchmarks.scenarios import benchmark_from_datasets

    stream = digits_stream()
    return benchmark_from_datasets(
        train=[as_avalanche(e.train) for e in stream], test=[as_avalanche(e.test) for e in stream]
    )


def run_avalanche(name: str) -> Timings:
    from avalanche.training import Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    stream, benchmark = digits_stream(), avalanche_benchmark()
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
    training, evaluation = Span(), Span()
    for experience in benchmark.train_stream:
        with training:
            strategy.train(experience, num_workers=0)
        with evaluation:
            strategy.eval(benchmark.test_stream, num_workers=0)
    # Scored outside the timers, the same way as the bare loop, as a sanity check.
    return training, evaluation, bare_scores(model, stream)


SYSTEMS: dict[str, Callable[[], Timings]] = {
    "bare_naive": lambda: run_bare(replay=False),
    "bare_replay": lambda: run_bare(replay=True),
    "fl_naive": lambda: run_forgetless("naive"),
    "fl_rehearsal": lambda: run_forgetless("rehearsal"),
    "av_naive": lambda: run_avalanche("naive"),
    "av_replay": lambda: run_avalanche("replay"),
}


def time_systems() -> dict[str, dict]:
    """Every system once per round, in an order rotated each round; medians over rounds."""
    names = list(SYSTEMS)
    runs: dict[str, list[Timings]] = {n: [] for n in names}
    for r in range(ROUNDS):
        tick = time.perf_counter()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            # avalanche-lib re-arms its deprecation warnings on every call; keep them quiet.
            with warnings.catch_warnings(record=True):
                runs[name].append(SYSTEMS[name]())
        print(f"round {r + 1}/{ROUNDS}: {time.perf_counter() - tick:.1f} s", file=sys.stderr)
    out = {}
    for name, rows in runs.items():
        train_wall = [t.wall for t, _, _ in rows]
        out[name] = {
            "train_s": statistics.median(train_wall),
            "train_cpu_s": statistics.median(t.cpu for t, _, _ in rows),
            "eval_s": statistics.median(e.wall for _, e, _ in rows),
            "train_s_min": min(train_wall),
            "train_s_max": max(train_wall),
            "train_s_all": train_wall,
            "final_avg_acc": statistics.mean(rows[-1][2]),
        }
    return out


# --- MLflow share ------------------------------------------------------------------------


class Stopwatch:
    """Time spent inside wrapped callables, per bucket.

    A call made inside another wrapped call is recorded under "<bucket>[nested]" (a
    breakdown of its caller) so that `total` never counts the same time twice.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.depth = 0

    def total(self, prefix: str) -> float:
        return sum(v for k, v in self.times.items() if k.startswith(prefix) and "[" not in k)

    def wrap(self, owner, attr: str, bucket: str) -> None:
        raw = owner.__dict__[attr]
        is_classmethod = isinstance(raw, classmethod)
        fn = raw.__func__ if is_classmethod else raw

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            key = f"{bucket}[nested]" if self.depth else bucket
            self.depth += 1
            tick = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - tick

        setattr(owner, attr, classmethod(timed) if is_classmethod else timed)


def measure_mlflow() -> dict[str, dict[str, float]]:
    """Real cells through run_cell into a temporary SQLite store, tracker calls timed."""
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    watch = Stopwatch()
    # Every public method of the tracker's cell run, whatever it is named today; its
    # classmethods (start, resume, ...) are the ways a cell's run is opened.
    for attr, raw in list(vars(tracking.CellRun).items()):
        if not attr.startswith("_") and (inspect.isfunction(raw) or isinstance(raw, classmethod)):
            bucket = "mlflow.start" if isinstance(raw, classmethod) else f"mlflow.{attr}"
            watch.wrap(tracking.CellRun, attr, bucket)
    watch.wrap(MlflowClient, "log_artifacts", "log_artifacts")  # inside start/finish/fail
    watch.wrap(MlflowClient, "set_tag", "mlflow.set_tag")  # the runner's untrained warning
    # Drawn by the runner only to be logged; run_cell imports it from plots at each call.
    watch.wrap(plots, "accuracy_heatmap", "figure")
    watch.wrap(checkpoint, "save", "checkpoint")
    per: dict[str, list[dict[str, float]]] = {"naive": [], "rehearsal": []}
    with tempfile.TemporaryDirectory(prefix="forgetless-overhead-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        grid_run = tracking.open_grid(uri, GRID["name"], 2 * MLFLOW_CELLS, GRID)
        for k in range(MLFLOW_CELLS):
            for name in ("naive", "rehearsal") if k % 2 == 0 else ("rehearsal", "naive"):
                watch.times = {}
                gc.collect()
                tick = time.perf_counter()
                # A fresh storage folder each time, or run_cell would resume the finished cell.
                outcome = run_cell(CELLS[name], grid_run, str(Path(tmp) / f"runs{k}"), "cpu")
                wall = time.perf_counter() - tick
                if outcome.status != "FINISHED":
                    raise RuntimeError(f"{outcome.label}: {outcome.error}")
                row = {k: v for k, v in watch.times.items() if "[" not in k}
                for k, v in watch.times.items():  # a bucket only ever timed nested
                    row.setdefault(k.replace("[nested]", ""), v)
                per[name].append({**row, "wall_s": wall, "mlflow_s": watch.total("mlflow")})
    results = {}
    for name, rows in per.items():
        warm = rows[1:]  # the first cell pays one-time costs (SQLAlchemy engine, imports)

        def med(key: str, rows=warm) -> float:
            return statistics.median(r.get(key, 0.0) for r in rows)

        results[name] = {
            "wall_s": med("wall_s"),
            "mlflow_s": med("mlflow_s"),
            "share": statistics.median(r["mlflow_s"] / r["wall_s"] for r in warm),
            "share_with_figure": statistics.median(
                (r["mlflow_s"] + r.get("figure", 0.0)) / r["wall_s"] for r in warm
            ),
            "start_s": med("mlflow.start"),
            "log_step_s": med("mlflow.log_step"),
            "finish_s": med("mlflow.finish"),
            "finish_log_artifacts_s": med("log_artifacts"),
            "figure_draw_s": med("figure"),
            "checkpoint_s": med("checkpoint"),
            "cold_wall_s": rows[0]["wall_s"],
            "cold_share": rows[0]["mlflow_s"] / rows[0]["wall_s"],
        }
    return results


# --- report ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for tests")
    smoke = parser.parse_args().smoke
    if smoke:
        use_smoke_sizes()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="No loggers specified")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    systems = time_systems()
    mlflow = measure_mlflow()

    def ratio(a: str, b: str, key: str = "train_s") -> float:
        return systems[a][key] / systems[b][key]

    pairs = {
        "naive_vs_bare": ("fl_naive", "bare_naive"),
        "rehearsal_vs_bare": ("fl_rehearsal", "bare_replay"),
        "avalanche_naive_vs_forgetless": ("av_naive", "fl_naive"),
        "avalanche_replay_vs_forgetless": ("av_replay", "fl_rehearsal"),
        "avalanche_naive_vs_bare": ("av_naive", "bare_naive"),
        "avalanche_replay_vs_bare": ("av_replay", "bare_replay"),
    }
    ratios = {k: ratio(a, b) for k, (a, b) in pairs.items()}
    cpu_ratios = {k: ratio(a, b, "train_cpu_s") for k, (a, b) in pairs.items()}
    # The fastest run of each system: the least disturbed estimate, as a cross-check.
    min_ratios = {k: ratio(a, b, "train_s_min") for k, (a, b) in pairs.items()}
    mlflow_share = max(m["share"] for m in mlflow.values())
    met = {
        "naive_target_met": ratios["naive_vs_bare"] <= TARGET_FL_VS_BARE,
        "rehearsal_target_met": ratios["rehearsal_vs_bare"] <= TARGET_FL_VS_BARE,
        "avalanche_naive_target_met": ratios["avalanche_naive_vs_forgetless"] >= TARGET_AV_VS_FL,
        "avalanche_replay_target_met": ratios["avalanche_replay_vs_forgetless"] >= TARGET_AV_VS_FL,
        "mlflow_share_target_met": mlflow_share <= TARGET_MLFLOW_SHARE,
    }

    out = sys.stderr
    print(
        f"\nsplit_digits x{EXPERIENCES}, mlp {HIDDEN}, sgd lr={LR} momentum={MOMENTUM}, "
        f"epochs={EPOCHS}, batch={BATCH_SIZE}, 1 thread; medians of {ROUNDS} interleaved rounds "
        f"(load average {load_before:.1f} -> {os.getloadavg()[0]:.1f})",
        file=out,
    )
    header = ["train s", "min", "max", "train cpu", "eval s", "final acc"]
    print(f"{'system':<14}" + "".join(f"{h:>11}" for h in header), file=out)
    for name, m in systems.items():
        values = [m["train_s"], m["train_s_min"], m["train_s_max"], m["train_cpu_s"]]
        print(
            f"{name:<14}"
            + "".join(f"{v:>11.3f}" for v in values)
            + f"{m['eval_s']:>11.4f}{m['final_avg_acc']:>11.3f}",
            file=out,
        )
    print(f"\n{'training-time ratio':<34}{'median':>8}{'min':>8}{'cpu':>8}", file=out)
    for k in ratios:
        print(f"{k:<34}{ratios[k]:>8.2f}{min_ratios[k]:>8.2f}{cpu_ratios[k]:>8.2f}", file=out)
    columns = {
        "wall_s": "wall s",
        "mlflow_s": "mlflow s",
        "share": "share",
        "start_s": "start",
        "log_step_s": "steps",
        "finish_s": "finish",
        "finish_log_artifacts_s": "(files)",
        "figure_draw_s": "draw fig",
        "share_with_figure": "+fig share",
        "checkpoint_s": "ckpt",
        "cold_share": "cold share",
    }
    print(
        f"\nMLflow in run_cell (SQLite; medians of {MLFLOW_CELLS - 1} warm cells; seconds; "
        "files = log_artifacts inside finish)",
        file=out,
    )
    print(f"{'cell':<11}" + "".join(f"{h:>11}" for h in columns.values()), file=out)
    for name, m in mlflow.items():
        cells = [f"{m[k]:>11.1%}" if "share" in k else f"{m[k]:>11.3f}" for k in columns]
        print(f"{name:<11}" + "".join(cells), file=out)
    print(f"\n{met}\ntotal {time.perf_counter() - started:.0f} s", file=out)

    result = {
        **ratios,
        "mlflow_share": mlflow_share,
        **met,
        "train_s": {n: m["train_s"] for n, m in systems.items()},
        "eval_s": {n: m["eval_s"] for n, m in systems.items()},
        "train_cpu_s": {n: m["train_cpu_s"] for n, m in systems.items()},
        "cpu_ratios": cpu_ratios,
        "min_ratios": min_ratios,
        "train_s_all": {n: m["train_s_all"] for n, m in systems.items()},
        "final_avg_acc": {n: m["final_avg_acc"] for n, m in systems.items()},
        "mlflow": mlflow,
        "targets": {
            "forgetless_vs_bare_max": TARGET_FL_VS_BARE,
            "avalanche_vs_forgetless_min": TARGET_AV_VS_FL,
            "mlflow_share_max": TARGET_MLFLOW_SHARE,
        },
        "smoke": smoke,
        "config": {
            "stream": "split_digits",
            "n_experiences": EXPERIENCES,
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
            "load_average": [load_before, os.getloadavg()[0]],
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
