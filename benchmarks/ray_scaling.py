"""Scaling of a grid on Ray over this machine's 2 cores against the same grid in one process.

The grid: 8 equal cells (split_digits, 5 experiences; `rehearsal` with a reservoir buffer
of 200; an MLP with hidden [256, 256]; SGD lr 0.05 momentum 0.9, batch size 32, E epochs
per experience; seeds 0..7), built with `grid_from_dict`, at two cell lengths, each
measured in a fresh process with a fresh Ray:

  E = 240  long cells: a small real grid. `speedup`.
  E = 60   a quarter of that: every worker's one-time start-up (its process, importing
           torch and MLflow, torch._dynamo on the first optimizer) is then a large share
           of the work. `speedup_short_cells`.

For each length, this times:

  sequential  `run_grid` with `local_executor`, every cell in this process, one after
              another, with torch limited to 1 thread (as each Ray cell is: the Ray
              executor passes threads = resources.cpu = 1), so both sides compute with
              one thread per cell and only the parallelism differs
  ray_startup `cluster.connect(None)`: the embedded Ray instance users get by default
  ray         `run_grid` with `ray_executor(resources cpu 1)`: 2 cells at a time. The
              wall time includes the first-task warm-up of each worker process (its
              start, importing torch, MLflow and the rest, opening the SQLite store):
              users pay it on every submission, so it counts

Both runs write to their own fresh temporary SQLite MLflow store and checkpoint folder
(`run_grid` skips cells FINISHED in its store, so they must not share one).

  speedup             sequential wall / Ray wall (neither includes ray.init)
  per_cell_overhead_s (2 * ray wall - sequential wall) / 8: worker-seconds per cell
                      beyond perfect 2-way parallelism
  parallel_efficiency speedup / 2

From Ray's task events (`ray.timeline()`) it also reports, per worker, when its first
cell started, how long after submission (`wait`: the worker process starting, plus
loading the task function, which imports forgetless.experiments.cluster and with it
torch and MLflow), and how long its first cell took against its later ones (the first
also imports the stream's modules and opens the SQLite store).

The machine may be shared: the load average is printed beside the figures, since a core
taken by another process makes 2-way parallelism impossible to measure. As a cross-check
that load barely moves, it sums CPU seconds: the driver's for the sequential run; the
driver's, the Ray workers' and Ray's daemons' for the Ray run. `speedup_cpu_bound` =
sequential CPU / (Ray CPU / 2) is the speedup the Ray run would reach on 2 free cores.

Run: `.venv/bin/python benchmarks/ray_scaling.py` (`--epochs E`: one length only). The last
line is one JSON object. `--smoke` takes the same path at sizes that run in seconds (2 cells
of 2 experiences, a narrow MLP, one length of 1 epoch for both), for tests: its figures
measure nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:  # torch and forgetless are imported where used: `main` runs without them
    from forgetless.experiments.config import Grid
    from forgetless.experiments.runner import CellOutcome

CELLS = 8
EXPERIENCES = 5
LONG_EPOCHS, SHORT_EPOCHS = 240, 60
HIDDEN = [256, 256]
TARGET_SPEEDUP = 1.7  # 85% parallel efficiency on 2 cores

GRID = {
    "name": "ray_scaling",
    "seeds": list(range(CELLS)),
    "streams": [{"name": "split_digits", "n_experiences": EXPERIENCES}],
    "model": {"name": "mlp", "hidden": HIDDEN},
    "train": {"batch_size": 32, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9},
    "strategies": [{"name": "rehearsal", "buffer": {"size": 200, "policy": "reservoir"}}],
    "resources": {"cpu": 1, "gpu": 0},
}


def use_smoke_sizes() -> None:
    """--smoke: the fewest cells that keep 2 cores busy, 2 experiences, a narrow MLP, and
    one cell length (1 epoch) standing for both: a length is measured once."""
    global CELLS, EXPERIENCES, LONG_EPOCHS, SHORT_EPOCHS, HIDDEN
    CELLS, EXPERIENCES, LONG_EPOCHS, SHORT_EPOCHS, HIDDEN = 2, 2, 1, 1, [32]
    GRID.update(seeds=list(range(CELLS)), model={"name": "mlp", "hidden": HIDDEN})
    GRID["streams"][0]["n_experiences"] = EXPERIENCES


def build_grid(storage: Path, epochs: int) -> Grid:
    from forgetless.experiments.config import grid_from_dict

    train = {**GRID["train"], "epochs": epochs}
    grid = grid_from_dict({**GRID, "train": train, "storage": str(storage)})
    if len(grid.cells) != CELLS:
        raise RuntimeError(f"the grid expands to {len(grid.cells)} cells, not {CELLS}")
    return grid


def timed_grid(grid: Grid, folder: Path, executor) -> tuple[float, float, list[CellOutcome]]:
    """(epoch start, wall seconds, outcomes) of `run_grid` into a fresh store in `folder`."""
    from forgetless.experiments.runner import run_grid

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    start_epoch, tick = time.time(), time.perf_counter()
    outcomes = run_grid(grid, uri, executor)
    wall = time.perf_counter() - tick
    bad = [o for o in outcomes if o.status != "FINISHED"]
    if bad:
        raise RuntimeError(f"{bad[0].label}: {bad[0].status} {bad[0].error}")
    return start_epoch, wall, outcomes


def task_timings(start_epoch: float) -> dict:
    """Per worker, from Ray's task events: first cell against later ones (seconds).

    Times are from the `run_grid` call. Task events reach the GCS asynchronously, so
    wait until all CELLS tasks are there.
    """
    import ray

    tasks: list[dict] = []
    for _ in range(20):
        events = ray.timeline()
        tasks = [e for e in events if e.get("name", "").endswith("_run_cell_task")]
        if len(tasks) >= CELLS:
            break
        time.sleep(0.5)
    else:
        return {"error": f"only {len(tasks)} of {CELLS} task events arrived"}
    # Ray's own start-up submits a few tasks too: keep those made during run_grid.
    submits = [e["ts"] / 1e6 - start_epoch for e in events if e.get("name") == "submit_task"]
    submitted = min((t for t in submits if t >= 0), default=0.0)
    workers: dict[str, list[dict]] = {}
    for e in sorted(tasks, key=lambda e: e["ts"]):
        start = e["ts"] / 1e6 - start_epoch
        workers.setdefault(e["tid"], []).append({"start_s": start, "task_s": e["dur"] / 1e6})
    per_worker = []
    for rows in workers.values():
        later = [r["task_s"] for r in rows[1:]]
        per_worker.append(
            {
                "cells": len(rows),
                "first_start_s": rows[0]["start_s"],
                "wait_for_worker_s": rows[0]["start_s"] - submitted,
                "first_task_s": rows[0]["task_s"],
                "later_task_s_median": statistics.median(later) if later else None,
                "idle_between_tasks_s": sum(
                    b["start_s"] - (a["start_s"] + a["task_s"]) for a, b in zip(rows, rows[1:])
                ),
            }
        )
    return {
        "submitted_s": submitted,
        "workers": per_worker,
        "last_task_end_s": max(
            r["start_s"] + r["task_s"] for rows in workers.values() for r in rows
        ),
    }


def refuse_running_cluster() -> None:
    """Stop if connect(None) would join a cluster ($RAY_ADDRESS) instead of starting the
    embedded instance this benchmark measures. A Ray started on this machine by `ray start`
    is not joined (connect passes address="local"), but it shares the cores: say so."""
    from ray._private.utils import read_ray_address

    if os.environ.get("RAY_ADDRESS"):
        raise SystemExit(
            f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}: connect(None) would join that cluster "
            "instead of starting the embedded instance this benchmark measures; unset it"
        )
    if read_ray_address():
        print(
            f"note: another Ray runs on this machine ({read_ray_address()}); it is not "
            "joined, but whatever it runs shares the cores",
            file=sys.stderr,
        )


def descendant_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's descendants: Ray workers, Ray daemons.

    Workers that exited (Ray replaces idle or dead ones) count through their parent's
    children_user/children_system, which is where the raylet reaps them.
    """
    out = {"workers": 0.0, "daemons": 0.0}
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            worker = p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline())
        except psutil.Error:
            continue
        out["workers" if worker else "daemons"] += t.user + t.system
        out["workers"] += t.children_user + t.children_system
    return out


def final_accuracies(outcomes: list[CellOutcome]) -> dict[str, float]:
    return {o.cell_hash: o.summary["avg_acc"] for o in outcomes}


def median_train(outcomes: list[CellOutcome]) -> float:
    return statistics.median(o.summary["train_time_s"] for o in outcomes)


def measure(epochs: int) -> dict:
    """Sequential against Ray for cells of `epochs` epochs per experience (see the top)."""
    import torch

    from forgetless.experiments.runner import local_executor

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    refuse_running_cluster()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    out = sys.stderr
    with tempfile.TemporaryDirectory(prefix="forgetless-ray-scaling-") as tmp:
        tmp = Path(tmp)
        for name in ("sequential", "ray"):
            (tmp / name).mkdir()

        # Sequential. local_executor passes no thread count to run_cell, so without this
        # torch would use both cores for one cell; Ray cells get threads = resources.cpu = 1.
        # One thread per cell on both sides: only the number of cells at a time differs.
        torch.set_num_threads(1)
        print(f"sequential: {CELLS} cells in this process, 1 torch thread ...", file=out)
        cpu = time.process_time()
        _, sequential_s, seq_outcomes = timed_grid(
            build_grid(tmp / "sequential" / "runs", epochs), tmp / "sequential", local_executor
        )
        sequential_cpu_s = time.process_time() - cpu
        print(f"  {sequential_s:.2f} s", file=out)

        import ray

        from forgetless.experiments.cluster import connect, ray_executor

        refuse_running_cluster()
        tick = time.perf_counter()
        connect(None)  # the embedded default, as `forgetless run` without --address
        ray_startup_s = time.perf_counter() - tick
        cpus = ray.cluster_resources().get("CPU", 0)
        print(f"ray.init (cluster.connect(None)): {ray_startup_s:.2f} s, {cpus:g} CPUs", file=out)

        grid = build_grid(tmp / "ray" / "runs", epochs)
        print(f"ray: {CELLS} cells, cpu 1 each ...", file=out)
        cpu, cpu_before = time.process_time(), descendant_cpu()
        ray_start_epoch, ray_s, ray_outcomes = timed_grid(
            grid, tmp / "ray", ray_executor(grid.resources, len(grid.cells))
        )
        cpu_after = descendant_cpu()
        ray_cpu_s = {"driver": time.process_time() - cpu}
        ray_cpu_s.update({k: cpu_after[k] - cpu_before[k] for k in cpu_after})
        print(f"  {ray_s:.2f} s", file=out)
        try:
            tasks = task_timings(ray_start_epoch)
        except Exception as e:  # noqa: BLE001 - the breakdown is a diagnosis, not the result
            tasks = {"error": f"{type(e).__name__}: {e}"}
        ray.shutdown()

    speedup = sequential_s / ray_s
    per_cell_overhead_s = (2 * ray_s - sequential_s) / CELLS
    seq_acc, ray_acc = final_accuracies(seq_outcomes), final_accuracies(ray_outcomes)
    results_match = seq_acc.keys() == ray_acc.keys() and all(
        abs(seq_acc[k] - ray_acc[k]) < 1e-6 for k in seq_acc
    )
    train_seq, train_ray = median_train(seq_outcomes), median_train(ray_outcomes)
    # Load-robust cross-check: CPU seconds do not grow (much) when other processes take
    # the cores; wall seconds do. On 2 free cores the Ray run cannot beat half its CPU.
    ray_cpu_total = sum(ray_cpu_s.values())
    speedup_cpu_bound = sequential_cpu_s / (ray_cpu_total / 2)
    per_cell_overhead_cpu_s = (ray_cpu_total - sequential_cpu_s) / CELLS
    load_after = os.getloadavg()[0]

    print(
        f"\n{CELLS} cells: split_digits x{EXPERIENCES}, rehearsal (reservoir 200), mlp {HIDDEN}, "
        f"{epochs} epochs, 1 torch thread per cell; load average {load_before:.2f} -> "
        f"{load_after:.2f}",
        file=out,
    )
    print(f"{'sequential wall':<34}{sequential_s:>9.2f} s", file=out)
    print(f"{'ray wall (2 cells at a time)':<34}{ray_s:>9.2f} s", file=out)
    print(f"{'ray startup (not in ray wall)':<34}{ray_startup_s:>9.2f} s", file=out)
    print(f"{'speedup':<34}{speedup:>9.2f}   (target >= {TARGET_SPEEDUP})", file=out)
    print(f"{'parallel efficiency':<34}{speedup / 2:>9.1%}", file=out)
    print(f"{'per-cell overhead':<34}{per_cell_overhead_s:>9.2f} s", file=out)
    print(
        f"{'median cell training time':<34}{train_seq:>9.2f} s sequential, "
        f"{train_ray:.2f} s on Ray ({train_ray / train_seq - 1:+.1%})",
        file=out,
    )
    print(f"{'same final accuracies':<34}{results_match!s:>9}", file=out)
    print(
        f"{'CPU seconds':<34}{sequential_cpu_s:>9.2f} s sequential, {ray_cpu_total:.2f} s on "
        "Ray (" + ", ".join(f"{k} {v:.2f}" for k, v in ray_cpu_s.items()) + ")",
        file=out,
    )
    print(
        f"{'CPU-bound speedup':<34}{speedup_cpu_bound:>9.2f}   (sequential CPU / half the Ray "
        f"CPU: the speedup on 2 free cores; {per_cell_overhead_cpu_s:.2f} extra CPU s per cell)",
        file=out,
    )
    if "workers" in tasks:
        print(
            f"\nRay tasks per worker (seconds from the run_grid call; run_grid submitted "
            f"the tasks at {tasks['submitted_s']:.2f}, after checking and opening the store):",
            file=out,
        )
        header = ["cells", "1st start", "wait", "1st task", "later task", "idle"]
        print("".join(f"{h:>11}" for h in header), file=out)
        for w in tasks["workers"]:
            later = w["later_task_s_median"]
            values = [w["first_start_s"], w["wait_for_worker_s"], w["first_task_s"]]
            print(
                f"{w['cells']:>11}"
                + "".join(f"{v:>11.2f}" for v in values)
                + (f"{later:>11.2f}" if later is not None else f"{'-':>11}")
                + f"{w['idle_between_tasks_s']:>11.2f}",
                file=out,
            )
        print(
            f"last task ended {tasks['last_task_end_s']:.2f} s after run_grid started; "
            f"run_grid returned at {ray_s:.2f} s",
            file=out,
        )
        if len(tasks["workers"]) > cpus:
            print(
                "note: more workers than CPUs ran cells: a worker died or was killed and Ray "
                "retried its cell (resumed from its checkpoint) on a new one",
                file=out,
            )
    else:
        print(f"\nno per-task breakdown: {tasks['error']}", file=out)
    if load_before > 0.5 or load_after > 2.5:
        print(
            "note: other processes loaded this machine during the run; on 2 cores that "
            "alone keeps the speedup down",
            file=out,
        )
    print(f"total {time.perf_counter() - started:.0f} s", file=out)

    result = {
        "speedup": speedup,
        "ray_startup_s": ray_startup_s,
        "per_cell_overhead_s": per_cell_overhead_s,
        "parallel_efficiency": speedup / 2,
        "cells": CELLS,
        "sequential_s": sequential_s,
        "ray_s": ray_s,
        "target_speedup": TARGET_SPEEDUP,
        "target_met": speedup >= TARGET_SPEEDUP,
        "cell_train_s_median": {"sequential": train_seq, "ray": train_ray},
        "cpu_s": {"sequential": sequential_cpu_s, "ray": ray_cpu_s},
        "speedup_cpu_bound": speedup_cpu_bound,
        "per_cell_overhead_cpu_s": per_cell_overhead_cpu_s,
        "results_match": results_match,
        "final_avg_acc_mean": statistics.mean(seq_acc.values()),
        "ray_tasks": tasks,
        "config": {
            "stream": "split_digits",
            "n_experiences": EXPERIENCES,
            "strategy": "rehearsal",
            "buffer": 200,
            "hidden": HIDDEN,
            "epochs": epochs,
            "seeds": GRID["seeds"],
            "threads_per_cell": 1,
            "ray_cpus": cpus,
            "torch": torch.__version__,
            "ray": ray.__version__,
            "load_average": [load_before, load_after],
        },
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, help="measure one cell length only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for tests")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_sizes()
    if args.epochs:
        print(json.dumps(measure(args.epochs)))
        return
    runs = {}
    for epochs in dict.fromkeys((LONG_EPOCHS, SHORT_EPOCHS)):  # a fresh process each: nothing warm
        out = subprocess.run(
            [sys.executable, __file__, "--epochs", str(epochs),
             *(["--smoke"] if args.smoke else [])],
            stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        runs[epochs] = json.loads(out.stdout.strip().splitlines()[-1])
    long, short = runs[LONG_EPOCHS], runs[SHORT_EPOCHS]
    summary = {
        "speedup": long["speedup"],
        "speedup_short_cells": short["speedup"],
        "ray_startup_s": long["ray_startup_s"],
        "per_cell_overhead_s": long["per_cell_overhead_s"],
        "per_cell_overhead_s_short_cells": short["per_cell_overhead_s"],
        "speedup_cpu_bound": long["speedup_cpu_bound"],
        "speedup_cpu_bound_short_cells": short["speedup_cpu_bound"],
        "cell_train_s_median": long["cell_train_s_median"]["sequential"],
        "cell_train_s_median_short_cells": short["cell_train_s_median"]["sequential"],
        "target_speedup": TARGET_SPEEDUP,
        "target_met": long["target_met"],
        "runs": {f"epochs_{e}": r for e, r in runs.items()},
        "smoke": args.smoke,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
