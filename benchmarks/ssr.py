"""Naive fine-tuning vs real rehearsal vs self-synthesized rehearsal (SSR), from one base.

One grid (the strategies of grids/ssr.yaml, every seed) runs through forgetless' runner on
the embedded Ray, as `forgetless run` runs it (a cell per core at a time), on an
instruction stream that starts from the cached pre-trained base, which is also SSR's
generator. Rehearsal keeps k random real instances of each finished task (`per_task`); SSR
keeps k synthetic ones of each. Reported: final average exact match and general retention
per method (means over seeds), the share of rehearsal's gain over naive that SSR recovers
on each, and the real training instances found in SSR's buffers (read back from the cells'
checkpoints). The last line is one JSON object.

    python benchmarks/ssr.py [--grid grids/ssr.yaml] [--seeds 0,1,2] [--smoke]

`--smoke` runs the same code on the grid at its smallest (see `smoke_grid`), in seconds, for
tests: its figures measure nothing. The cells keep their final checkpoints for the buffer
check (benchmarks/kept_checkpoints.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import yaml

GRID = Path(__file__).resolve().parents[1] / "grids" / "ssr.yaml"


def smoke_grid(g: dict) -> dict:
    """The grid at its smallest: one seed, a one-layer model, two tasks of 16 examples from
    a base mixture of 16 examples a task learned for one epoch, 2 instances kept per task
    (SSR: chosen among 4 candidates)."""
    g["seeds"] = g["seeds"][:1]
    g["model"].update(layers=1, hidden=32, heads=2, intermediate=64)
    stream = g["streams"][0]
    base = {**stream["base"], "train_size": 16, "epochs": 1, "warmup_steps": 0, "general_size": 8}
    stream.update(tasks=stream["tasks"][:2], train_size=16, test_size=8, base=base)
    g["train"].update(batch_size=8, warmup_steps=0)
    for entry in g["strategies"]:
        if isinstance(entry, dict) and entry["name"] == "rehearsal":
            entry.update(buffer={**entry["buffer"], "size": 4}, per_task=2)
        elif isinstance(entry, dict) and entry["name"] == "ssr":
            entry.update(instances_per_task=2, candidates_per_task=4)
    return g


def grid(args: argparse.Namespace, storage: str) -> dict:
    """grids/ssr.yaml (or --grid) as written, but for the seeds and the storage."""
    g = yaml.safe_load(Path(args.grid).read_text())
    if args.smoke:
        g = smoke_grid(g)
    g.update(name="ssr-benchmark", storage=storage)
    if args.seeds:
        g["seeds"] = [int(s) for s in args.seeds.split(",")]
    return g


def recovered(ssr: float, naive: float, rehearsal: float) -> float | None:
    """(ssr - naive) / (rehearsal - naive); None (undefined) when rehearsal gains nothing or a
    score is undefined (general retention of a base that scores 0)."""
    gain = rehearsal - naive
    ratio = (ssr - naive) / gain if abs(gain) > 1e-9 else float("nan")
    return ratio if math.isfinite(ratio) else None


def real_instances_kept(cells, storage: str) -> int:
    """Rows of SSR's final buffers that equal a real training row of any task."""
    from kept_checkpoints import final_state

    from forgetless.experiments.runner import build_cell

    found = 0
    for cell in cells:
        if cell.config["strategy"]["name"] != "ssr":
            continue
        stream, _ = build_cell(cell, "cpu")
        real = {tuple(r) for e in stream for r in e.train.x.tolist()}
        buffer = final_state(storage, cell)["strategy"]["buffer"]["samples"]
        rows = [] if buffer is None else buffer["x"].tolist()
        found += sum(tuple(r) in real for r in rows)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default=str(GRID), help="naive, rehearsal and ssr cells")
    parser.add_argument("--seeds", help="comma-separated; default: the grid's")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import numpy as np
    import torch
    from kept_checkpoints import keeping_final_checkpoints

    from forgetless.experiments.cluster import connect, ray_executor
    from forgetless.experiments.config import grid_from_dict
    from forgetless.experiments.runner import build_cell, run_grid

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        g = grid_from_dict(grid(args, f"{folder}/runs"))
        start = time.perf_counter()
        build_cell(g.cells[0], "cpu")  # trains or loads the cached base outside the timing
        base_s = time.perf_counter() - start
        start = time.perf_counter()
        connect(None)  # the embedded Ray of `forgetless run`: a cell per core at a time
        executor = keeping_final_checkpoints(ray_executor(g.resources, len(g.cells)))
        outcomes = run_grid(g, f"sqlite:///{folder}/mlflow.db", executor)
        grid_s = time.perf_counter() - start
        failed = [o for o in outcomes if o.status != "FINISHED"]
        if failed:
            raise RuntimeError("; ".join(f"{o.label}: {o.error}" for o in failed))
        kept = real_instances_kept(g.cells, g.storage)
    by_method: dict[str, dict[int, dict]] = {}
    cells = {c.hash: c for c in g.cells}  # outcomes come as cells end, not in grid order
    for outcome in outcomes:
        cell = cells[outcome.cell_hash]
        by_method.setdefault(cell.config["strategy"]["name"], {})[cell.seed] = outcome.summary
    summary: dict = {}
    for method, per_seed in by_method.items():
        runs = list(per_seed.values())
        for key, name in (("avg_acc", "acc"), ("general_retention", "retention")):
            values = [r.get(key, float("nan")) for r in runs]
            finite = all(math.isfinite(v) for v in values)  # JSON has no NaN
            summary[f"{name}_{method}"] = float(np.mean(values)) if finite else None
            summary[f"{name}_{method}_std"] = float(np.std(values)) if finite else None
            summary[f"{name}_{method}_per_seed"] = values if finite else None
        summary[f"memory_bytes_{method}"] = float(np.mean([r["memory_bytes"] for r in runs]))
        summary[f"train_time_s_{method}"] = float(np.mean([r["train_time_s"] for r in runs]))
    s = summary
    s["gain_recovered"] = recovered(s["acc_ssr"], s["acc_naive"], s["acc_rehearsal"])
    retention = [s[f"retention_{m}"] for m in ("ssr", "naive", "rehearsal")]
    s["retention_recovered"] = None if None in retention else recovered(*retention)
    s["gain_recovered_per_seed"] = {  # how far the ratio of means moves with the seed
        seed: recovered(*(by_method[m][seed]["avg_acc"] for m in ("ssr", "naive", "rehearsal")))
        for seed in by_method["ssr"]
    }
    s["real_instances_in_ssr_buffers"] = kept
    stream = g.cells[0].config["stream"]
    s.update(seeds=len({c.seed for c in g.cells}), tasks=stream["tasks"],
             train_size=stream["train_size"], base_s=base_s, grid_s=grid_s)  # fmt: skip
    s["targets"] = {
        "gain_recovered_at_least_0.9": (s["gain_recovered"] or 0) >= 0.9,
        "retention_recovered_at_least_0.9": (s["retention_recovered"] or 0) >= 0.9,
        "no_real_instance_kept": kept == 0,
        "under_30_minutes": base_s + grid_s < 1800,
    }
    s["smoke"] = args.smoke
    print(json.dumps(s))


if __name__ == "__main__":
    main()
