"""Lifelong editing: FT-L vs GRACE vs WISE after T = 1, 10, 100 sequential edits.

Every cell runs through the runner (experiments.runner.run_grid, the one code path) from
the same cached base model, on the same edits (the cell seed draws them), into a
throwaway MLflow store. First the base model is scored on what editing presumes: the
held-out paraphrases of its own facts (`base_paraphrase_acc`) and the true answers of the
locality facts (`base_locality_acc`), exact match. T = 1 averages single edits over
`--single-seeds` seeds (edit, score, new cell); T >= 10 is one seed. The last line is one
JSON object; scores are exact match (token accuracy beside them with `_token_acc`).

    python -u benchmarks/editing.py > editing.log 2>&1

`--smoke` runs the same code at the smallest sizes (see `use_smoke_sizes`), in seconds,
for tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from forgetless.core.schema import parse
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import evaluate
from forgetless.experiments.runner import build_cell, run_grid
from forgetless.streams.editing import PycountryEditsConfig, pycountry_edits

GRID = yaml.safe_load((Path(__file__).resolve().parents[1] / "grids/wise_editing.yaml").read_text())
MODEL = GRID["model"]
STREAM = {k: v for k, v in GRID["streams"][0].items() if k != "edits"}
STRATEGIES = {entry["name"]: entry for entry in GRID["strategies"]}
SCORES = ("reliability", "generalization", "locality")


def use_smoke_sizes() -> None:
    """--smoke: a one-layer model on a base corpus of 12 subjects learned for one epoch, and
    editors that edit its one layer in 2 steps. The base is cached as the full run's is,
    under its own key."""
    MODEL.update(layers=1, hidden=32, heads=2, intermediate=64, vocab=300)
    STREAM.update(subjects=12, locality=4, reserve=2, base={**STREAM["base"], "epochs": 1})
    for strategy in STRATEGIES.values():
        strategy.update(steps=2, **({"layer": 0} if "layer" in strategy else {}))


def grid(name: str, edits: int, seeds: list[int], strategies: list[dict], folder: str):
    stream = {**STREAM, "edits": edits}
    return grid_from_dict({
        "name": name, "seeds": seeds, "streams": [stream], "model": MODEL,
        "strategies": strategies, "storage": tempfile.mkdtemp(prefix="runs-", dir=folder),
    })  # fmt: skip


def base_scores(folder: str) -> dict[str, float]:
    """The cached base's exact match on held-out paraphrases and on the locality facts."""
    g = grid("edit-base", 1, [0], [STRATEGIES["ft_l"]], folder)
    _, strategy = build_cell(g.cells[0], "cpu")  # trains and caches the base if needed
    params = {k: v for k, v in {**STREAM, "edits": 1}.items() if k != "name"}
    raw = pycountry_edits(parse(PycountryEditsConfig, params, "stream"), 0)
    model = strategy.model
    return {
        "base_trained_acc": evaluate(strategy, model.encode(raw.base.train), "generation")[
            "exact_match"
        ],
        "base_paraphrase_acc": evaluate(strategy, model.encode(raw.base.paraphrases), "generation")[
            "exact_match"
        ],
        "base_locality_acc": evaluate(strategy, model.encode(raw.general), "generation")[
            "exact_match"
        ],
    }


def run(edits: int, seeds: list[int], methods: list[str], folder: str) -> dict:
    strategies = [copy.deepcopy(STRATEGIES[m]) for m in methods]
    g = grid(f"edit-T{edits}", edits, seeds, strategies, folder)
    uri = f"sqlite:///{os.path.join(folder, 'mlflow.db')}"
    start = time.perf_counter()
    outcomes = run_grid(g, uri)
    results: dict[str, dict] = {}
    for method in methods:
        rows = [o.summary for o in outcomes if o.label.split("/")[1].split(" ")[0] == method]
        failed = [o.error for o in outcomes if o.status != "FINISHED"]
        if not rows:
            results[method] = {"error": "; ".join(failed)}
            continue
        keys = [f"{s}{k}" for s in SCORES for k in ("", "_token_acc")] + ["edit_latency_s"]
        results[method] = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}
        results[method]["memory_bytes"] = int(np.mean([r["memory_bytes"] for r in rows]))
    logging.warning("T=%d done in %.0f s: %s", edits, time.perf_counter() - start, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--methods", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--single-seeds", type=int, default=3)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, T = 1 and 2 on one seed: seconds"
    )
    args = parser.parse_args()
    if args.smoke:
        use_smoke_sizes()
        args.edits, args.single_seeds = [1, 2], 1
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="forgetless-editing-") as folder:
        result: dict = base_scores(folder)
        logging.warning("base: %s", result)
        for edits in args.edits:
            seeds = list(range(args.single_seeds)) if edits == 1 else [0]
            result[f"T{edits}"] = run(edits, seeds, args.methods, folder)
    result["smoke"] = args.smoke
    print(json.dumps(result))


if __name__ == "__main__":
    main()
