"""Full fine-tuning vs HFT vs LoRA from one cached base, on one instruction stream.

Each method and seed runs as its own process (so peak memory is its own), one after
another, on the same stream and base; the cells run through forgetless' runner exactly as
a grid would. Reported per method, as means over the seeds (`--seeds`, default 0,1,2) and
per seed: peak memory (resident set on CPU), final average exact match, forgetting,
learning accuracy and general retention. Time per
step is then measured with the methods' steps taken in turns in one process (see
`interleaved_step_times`), with the time ratio expected from FLOPs for HFT beside it;
`--also-time-width 512` times the steps of a wider model as well (hidden 512, FFN 1024),
where matmuls take a larger share of a step. The last line is one JSON object.

    python benchmarks/partial_tuning.py [--grid grids/llm_partial_tuning_quick.yaml]
        [--seeds 0,1,2] [--also-time-width 512]

The stream, base, model and training settings are the quick grid's, so the benchmark and
`forgetless run grids/llm_partial_tuning_quick.yaml` measure the same thing. `--smoke` runs
the same code on the grid at its smallest (see `smoke_grid`), one seed and one round of 2
timed steps, in seconds, for tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

METHODS = {"fft": "naive", "hft": "hft", "lora": "lora"}  # method -> strategy name
GRID = Path(__file__).resolve().parents[1] / "grids" / "llm_partial_tuning_quick.yaml"


def smoke_grid(g: dict) -> dict:
    """The grid at its smallest: a two-block model (HFT freezes half the blocks), two tasks
    of 16 examples, a base mixture of 16 examples a task learned for one epoch."""
    g["model"].update(layers=2, hidden=32, heads=2, intermediate=64)
    stream = g["streams"][0]
    base = {**stream["base"], "train_size": 16, "epochs": 1, "warmup_steps": 0, "general_size": 8}
    stream.update(tasks=stream["tasks"][:2], train_size=16, test_size=8, base=base)
    g["train"].update(batch_size=8, warmup_steps=0)
    return g


def load(args: argparse.Namespace) -> dict:
    """The grid file, at its smallest with --smoke."""
    g = yaml.safe_load(Path(args.grid).read_text())
    return smoke_grid(g) if args.smoke else g


def grid(method: str, seed: int, args: argparse.Namespace, storage: str) -> dict:
    """The quick grid's stream, base, model and training, with one method (as the grid
    declares it, e.g. LoRA's rank and rate) and one seed."""
    g = load(args)
    name = METHODS[method]
    declared = [
        s for s in g["strategies"] if s == name or isinstance(s, dict) and s["name"] == name
    ]
    g.update(name=f"partial-tuning-{method}", seeds=[seed], strategies=declared[:1] or [name],
             storage=storage, grid={})  # fmt: skip
    return g


def mean(values: list[float | None]) -> float | None:
    """The mean over seeds; None if any seed's figure is undefined."""
    return None if None in values else float(np.mean(values))


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict:
    """One method's cell for one seed, in this process; returns its figures."""
    import torch

    from forgetless.experiments.config import grid_from_dict
    from forgetless.experiments.runner import build_cell, run_grid

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        g = grid_from_dict(grid(method, seed, args, f"{folder}/runs"))
        build_cell(g.cells[0], "cpu")  # trains or loads the cached base outside the timing
        start = time.perf_counter()
        (outcome,) = run_grid(g, f"sqlite:///{folder}/mlflow.db")
        wall = time.perf_counter() - start
    if outcome.status != "FINISHED":
        raise RuntimeError(f"{method}: {outcome.error}")
    stream, train = g.cells[0].config["stream"], g.cells[0].config["train"]
    batches = -(-stream["train_size"] // train["batch_size"])
    steps = len(stream["tasks"]) * train["epochs"] * batches
    s = outcome.summary
    return {
        "time_per_step_s": s["train_time_s"] / steps,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "avg_acc": s["avg_acc"],
        "forgetting": s["forgetting"],
        "learning_acc": s["learning_acc"],
        # None (JSON null) when the base scores 0 on its general set: retention is undefined.
        "general_retention": s.get("general_retention"),
        "cell_wall_s": wall,
    }


def interleaved_step_times(
    args: argparse.Namespace, width: int | None = None, rounds: int = 7, steps: int = 8
) -> dict:
    """Seconds per training step of each method, timed in turns in one process.

    The cells above run one after another, so their own step times drift with the load
    on a shared machine. Here every round trains each method for `steps` steps of the
    first task through its own `Strategy.train` (HFT draws its half, LoRA holds its
    adapter), in turn; the median round per method is robust to that drift.
    """
    import dataclasses

    import torch

    from forgetless.experiments.config import grid_from_dict
    from forgetless.experiments.runner import build_cell

    torch.set_num_threads(1)
    strategies, experience = {}, None
    with tempfile.TemporaryDirectory() as storage:  # a grid names one; training writes none
        for method in METHODS:
            raw = grid(method, args.seeds[0], args, storage)
            if width:  # a wider model, untrained: its weights do not change a step's time
                raw["model"].update(hidden=width, intermediate=2 * width)
                raw["streams"][0]["base"] = None
            g = grid_from_dict(raw)
            stream, strategies[method] = build_cell(g.cells[0], "cpu")
            batch = g.cells[0].config["train"]["batch_size"]
            first = stream.experiences[0]
            experience = dataclasses.replace(
                first, train=first.train.subset(torch.arange(steps * batch))
            )
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method, strategy in strategies.items():
            start = time.perf_counter()
            strategy.train(experience)
            times[method].append((time.perf_counter() - start) / steps)
    return {m: float(np.median(t)) for m, t in times.items()}


def hft_flop_ratio(model: dict) -> float:
    """Expected HFT/FFT step time if matmuls dominate: a weight costs F forward, F for the
    input gradient and F for its own gradient; a frozen block matrix skips the last F
    (and its optimizer update). Embedding lookups cost no matmul; the LM head does."""
    from forgetless.models.causal_lm import LlamaTinyConfig

    c = LlamaTinyConfig(**{k: v for k, v in model.items() if k != "name"})
    attention = 4 * c.hidden * c.hidden
    ffn = 3 * c.hidden * c.intermediate
    head = 384 * c.hidden  # ByT5's vocabulary x width
    total = c.layers * (attention + ffn) + head
    frozen = c.layers * (attention + ffn) / 2
    return 1 - frozen / (3 * total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=METHODS, help="(internal) run one method")
    parser.add_argument("--grid", default=str(GRID), help="stream, base, model and training")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; figures are means")
    parser.add_argument(
        "--also-time-width", type=int, help="time the steps on a wider model too (hidden size)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed: seconds")
    args = parser.parse_args()
    if args.smoke and not args.method:
        args.seeds = "0"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.method:
        print(json.dumps(run_one(args.method, args.seeds[0], args)))
        return
    results, per_seed = {}, {}
    for method in METHODS:
        per_seed[method] = []
        for seed in args.seeds:
            out = subprocess.run(
                [sys.executable, __file__, "--method", method, "--seeds", str(seed),
                 "--grid", args.grid, *(["--smoke"] if args.smoke else [])],
                stdout=subprocess.PIPE, text=True, check=True,  # its stderr: ours
            )  # fmt: skip
            per_seed[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(method, seed, per_seed[method][-1], file=sys.stderr, flush=True)
        results[method] = {k: mean([r[k] for r in per_seed[method]]) for k in per_seed[method][0]}
    fft, hft = results["fft"], results["hft"]
    timing = {"rounds": 1, "steps": 2} if args.smoke else {}
    step = interleaved_step_times(args, **timing)
    if args.also_time_width:
        wide = interleaved_step_times(args, args.also_time_width, **timing)
        model = load(args)["model"]
        model.update(hidden=args.also_time_width, intermediate=2 * args.also_time_width)
        step_wide = {
            "width": args.also_time_width,
            "hft_time_vs_fft": wide["hft"] / wide["fft"],
            "lora_time_vs_fft": wide["lora"] / wide["fft"],
            "hft_time_vs_fft_expected_from_flops": hft_flop_ratio(model),
            "time_per_step_s": wide,
        }
    summary = {
        "hft_time_vs_fft": step["hft"] / step["fft"],
        "lora_time_vs_fft": step["lora"] / step["fft"],
        "interleaved_time_per_step_s": step,
        "hft_time_vs_fft_of_whole_cells": hft["time_per_step_s"] / fft["time_per_step_s"],
        "hft_time_vs_fft_expected_from_flops": hft_flop_ratio(load(args)["model"]),
        **{f"{m}_{k}": v for m, r in results.items() for k, v in r.items()},
        "fft_new_task_acc": fft["learning_acc"],
        "hft_new_task_acc": hft["learning_acc"],
        "seeds": args.seeds,
        "per_seed": per_seed,
        "smoke": args.smoke,
    }
    if args.also_time_width:
        summary["wider_model"] = step_wide
    retention = [hft["general_retention"], fft["general_retention"]]
    summary["targets"] = {
        "hft_time_at_most_0.85_fft": summary["hft_time_vs_fft"] <= 0.85,
        "hft_forgets_less": hft["forgetting"] < fft["forgetting"],
        "hft_keeps_more_general": None not in retention and retention[0] > retention[1],
        "hft_new_task_within_5_points": hft["learning_acc"] >= fft["learning_acc"] - 0.05,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
