"""REMIND (product-quantized latent replay) vs float16 latent replay vs raw rehearsal at
equal memory bytes, on split digits with a 4-class base experience, 3 seeds, in one run.

Runs grids/remind.yaml through the runner (a temporary MLflow store and checkpoint
folder), so every number is what `forgetless run grids/remind.yaml` logs. Budgets are
25, 50 and 100 raw digits at their compact size (64 uint8 pixels + 1 label byte = 65
bytes): 1,625 / 3,250 / 6,500 bytes. Raw rehearsal stores uint8 images (`compact`);
REMIND's budget counts its codes, its labels and its float16 codebook; latent replay's
its float16 latents and labels. All strategies share the model, the training settings
(epochs, lr, batch and replay batch sizes) and the class-balanced eviction. Afterwards
each REMIND and latent-replay cell's checkpoint is loaded to read how many samples its
budget holds and, for REMIND, the codec's reconstruction error on G's test latents (the
cells keep their final checkpoints for this: benchmarks/kept_checkpoints.py).

Targets (issue #7): one PQ config, the same at every budget, holds >= 8x the samples of
raw rehearsal at every budget, and beats raw rehearsal's final average accuracy at every
budget (mean over seeds). `joint_upper_bound` is `cumulative` (all data seen so far) on
the same stream. Two more grids run here only, each one of the grid's strategies changed:
`latent_upper_bound`, latent replay with room for the whole stream (the ceiling a frozen
G leaves), and `acc_pq_score_decoded`, REMIND scoring test inputs through the codec as
the paper does (the grid scores G's latents as they are: `score_decoded: false`).

Run: `.venv/bin/python benchmarks/compressed_replay.py`. The last line is one JSON object.
`--smoke` runs the same code on the grid at its smallest (see `smoke_grid`), in seconds,
for tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from kept_checkpoints import final_state, keeping_final_checkpoints

from forgetless.experiments.config import Cell, Grid, grid_from_dict, load_grid
from forgetless.experiments.runner import build_cell, local_executor, run_grid

GRID = Path(__file__).resolve().parent.parent / "grids" / "remind.yaml"
RAW_SAMPLE_BYTES = 64 + 1  # an 8x8 digit as uint8 pixels and its label byte
TARGET_SAMPLES_RATIO = 8.0
NAMES = {"remind": "pq", "latent_replay": "latent", "rehearsal": "raw"}


def budget_of(cell: Cell) -> int | None:
    strategy = cell.config["strategy"]
    return strategy.get("bytes") or (strategy.get("buffer") or {}).get("bytes")


@torch.no_grad()
def inspect(cell: Cell, storage: str) -> dict[str, float]:
    """From a finished cell's checkpoint: samples its budget holds, bytes one costs, and for
    latent replay the codec's error on G's latents of every test image."""
    stream, strategy = build_cell(cell, "cpu")
    strategy.load_state_dict(final_state(storage, cell)["strategy"])
    if cell.strategy == "rehearsal":
        buffer = strategy.buffer
        per_sample = buffer.nbytes // len(buffer)
        return {"capacity": buffer.config.bytes // per_sample, "bytes_per_sample": per_sample}
    strategy.model.eval()
    latents = strategy.model.lower(torch.cat([e.test.x for e in stream]))
    decoded = strategy.codec.decode(strategy.codec.encode(latents))
    mse = torch.mean((decoded - latents) ** 2).item()
    return {
        "capacity": strategy.capacity,
        "stored": len(strategy.memory),
        "reconstruction_mse": mse,
        "relative_reconstruction_error": mse / latents.var(dim=0).mean().item(),
        "bytes_per_sample": strategy.sample_bytes,
        "codebook_bytes": strategy.codec.codebook_bytes,
        "latent_shape": list(strategy.latent_shape),
    }


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def variant(grid: Grid, suffix: str, name: str, **changes) -> Grid:
    """One of the grid's strategies, changed, on its own (over the byte axis unless the
    change sets the bytes)."""
    source = copy.deepcopy(grid.source)
    strategy = next(s for s in source["strategies"] if isinstance(s, dict) and s["name"] == name)
    axes = {} if "bytes" in changes else {"strategy.bytes": source["grid"]["strategy.bytes"]}
    source.update(name=f"{source['name']}-{suffix}", strategies=[{**strategy, **changes}])
    source["grid"] = axes
    return grid_from_dict(source)


def smoke_grid(grid: Grid) -> Grid:
    """The grid at its smallest: its first seed and first budget, a base experience and one
    more, one epoch, one base epoch."""
    source = copy.deepcopy(grid.source)
    source["seeds"] = source["seeds"][:1]
    source["streams"][0]["n_experiences"] = 2
    source["train"]["epochs"] = 1
    for strategy in source["strategies"]:
        if isinstance(strategy, dict) and "base_epochs" in strategy:
            strategy["base_epochs"] = 1
    source["grid"] = {key: values[:1] for key, values in source["grid"].items()}
    return grid_from_dict(source)


def run(grid: Grid, folder: str) -> list[dict]:
    """Every cell through the runner; a row per cell, with its checkpoint inspected."""
    grid = dataclasses.replace(grid, storage=f"{folder}/runs")
    executor = keeping_final_checkpoints(local_executor)
    outcomes = {o.cell_hash: o for o in run_grid(grid, f"sqlite:///{folder}/mlflow.db", executor)}
    failed = [o for o in outcomes.values() if o.status != "FINISHED"]
    if failed:
        raise RuntimeError(f"{failed[0].label}: {failed[0].error}")
    rows = []
    for cell in grid.cells:
        summary = outcomes[cell.hash].summary
        row = {"strategy": cell.strategy, "budget": budget_of(cell), "seed": cell.seed,
               "acc": summary["avg_acc"], "memory_bytes": summary["memory_bytes"]}  # fmt: skip
        if cell.strategy in NAMES:
            row.update(inspect(cell, grid.storage))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, for tests")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread per cell, as a Ray cell gets (faiss: see quantize)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    grid = load_grid(GRID)
    if args.smoke:
        grid = smoke_grid(grid)
    with tempfile.TemporaryDirectory(prefix="forgetless-remind-") as folder:
        rows = run(grid, folder)
        ceiling_grid = variant(grid, "ceiling", "latent_replay", bytes=10**6)
        published_grid = variant(grid, "score-decoded", "remind", score_decoded=True)
        ceiling = [r["acc"] for r in run(ceiling_grid, folder)]
        published = run(published_grid, folder)
    extra_cells = len(ceiling_grid.cells) + len(published_grid.cells)
    wall = time.perf_counter() - started

    def cells(strategy: str, budget: int | None = None) -> list[dict]:
        return [r for r in rows if r["strategy"] == strategy and r["budget"] == budget]

    budgets = sorted({r["budget"] for r in rows if r["strategy"] == "rehearsal"})
    raw_bytes = sorted({r["bytes_per_sample"] for r in rows if r["strategy"] == "rehearsal"})
    acc = {NAMES[s]: [mean([r["acc"] for r in cells(s, b)]) for b in budgets] for s in NAMES}
    std = {NAMES[s]: [statistics.pstdev([r["acc"] for r in cells(s, b)]) for b in budgets]
           for s in NAMES}  # fmt: skip
    samples = {NAMES[s]: [max(r["capacity"] for r in cells(s, b)) for b in budgets] for s in NAMES}
    ratios = [pq / raw for pq, raw in zip(samples["pq"], samples["raw"])]
    memory = {NAMES[s]: [max(r["memory_bytes"] for r in cells(s, b)) for b in budgets]
              for s in NAMES}  # fmt: skip
    acc["pq_score_decoded"] = [
        mean([r["acc"] for r in published if r["budget"] == b]) for b in budgets
    ]
    pq_cell = next(c for c in grid.cells if c.strategy == "remind")
    pq = cells("remind", budgets[0])[0]
    pq_config = {
        **{
            k: pq_cell.config["strategy"][k]
            for k in ("subquantizers", "bits", "base", "score_decoded")
        },
        **{k: pq[k] for k in ("latent_shape", "bytes_per_sample", "codebook_bytes")},
    }
    if raw_bytes != [RAW_SAMPLE_BYTES]:
        raise RuntimeError(f"raw rehearsal stored {raw_bytes} bytes a digit, not 65: use compact")
    met = {
        "samples_ratio_met": min(ratios) >= TARGET_SAMPLES_RATIO,
        "beats_raw_at_every_budget": all(p > r for p, r in zip(acc["pq"], acc["raw"])),
    }
    result = {
        "samples_per_byte_ratio": min(ratios),
        "acc_pq": acc["pq"],
        "acc_latent": acc["latent"],
        "acc_raw": acc["raw"],
        "acc_pq_score_decoded": acc["pq_score_decoded"],
        "acc_pq_minus_raw": [p - r for p, r in zip(acc["pq"], acc["raw"])],
        "acc_std": std,
        "budgets_bytes": budgets,
        "samples": samples,
        "samples_ratio_per_budget": ratios,
        "memory_bytes_max": memory,
        "raw_bytes_per_sample": raw_bytes,
        "reconstruction_mse": mean([r["reconstruction_mse"] for r in cells("remind", budgets[0])]),
        "relative_reconstruction_error": mean(
            [r["relative_reconstruction_error"] for r in cells("remind", budgets[0])]
        ),
        "pq_config": pq_config,
        "joint_upper_bound": mean([r["acc"] for r in cells("cumulative")]),
        "latent_upper_bound": mean(ceiling),
        **met,
        "targets": {"samples_ratio_min": TARGET_SAMPLES_RATIO, "acc_pq_above_acc_raw": True},
        "smoke": args.smoke,
        "config": {
            "grid": str(GRID.relative_to(GRID.parent.parent)),
            "stream": grid.cells[0].config["stream"],
            "model": grid.cells[0].config["model"],
            "train": grid.cells[0].config["train"],
            "seeds": sorted({c.seed for c in grid.cells}),
            "cells": len(grid.cells),
            "extra_cells": extra_cells,
            "threads": 1,
            "wall_s": wall,
            "load_average": [load_before, os.getloadavg()[0]],
        },
    }
    out = sys.stderr
    print(f"\n{GRID.name}: {len(grid.cells)} cells + {extra_cells} in {wall:.0f} s", file=out)
    header = f"{'bytes':>7}{'raw':>16}{'latent fp16':>16}{'REMIND (PQ)':>16}{'PQ/raw':>8}"
    print(f"{header}{'PQ scored decoded':>19}", file=out)
    for i, b in enumerate(budgets):
        line = "".join(f"{acc[k][i]:>9.3f} ({samples[k][i]:>4})" for k in ("raw", "latent", "pq"))
        print(f"{b:>7}{line}{ratios[i]:>8.1f}{acc['pq_score_decoded'][i]:>19.3f}", file=out)
    print(f"joint {result['joint_upper_bound']:.3f}  frozen-G ceiling "
          f"{result['latent_upper_bound']:.3f}  {met}", file=out)  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
