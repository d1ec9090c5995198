"""Larimar vs FT-L vs WISE: the same sequential edits from one cached base model.

The stream is `pycountry_edits` (issue #8: counterfactual edits of pycountry ISO codes,
paraphrases held out of the base corpus, locality prompts about subjects no edit touches),
its base model the cached tiny Llama the runner trains once. Every editor starts from the
base weights and takes the edits one experience (one edit) at a time; after the last edit
the shared evaluator (experiments.evaluate.score_edits) gives exact-match reliability,
generalization and locality over all edits. Seconds per edit is the wall time of the
editor's `train` calls over the number of edits; Larimar's one-off read-path training
(cached per base model) is reported apart, as the base model's own pre-training is.

Forgetting (Larimar only: neither FT-L nor WISE can forget): a second pass runs the same
edits as a stream with `forget_after: k` (edit t, forget it at t + k for every even t, as
long as t + k is within the stream). Forget success is the share of forgotten edits whose
prompt gives the base model's own greedy pre-edit answer again; the kept edits are scored
for reliability at the end of that pass (experiments.editing). The last line is one JSON
object.

    python benchmarks/larimar.py [--grid grids/larimar.yaml] [--edits 100] [--forget-after 10]
        [--editors larimar,ft_l,wise] [--larimar '{"scope_threshold": 0.2}'] [--smoke]

`--smoke` runs the same code at the smallest sizes (see `smoke_grid`), in seconds, for
tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

import torch
import yaml

log = logging.getLogger("benchmarks.larimar")
GRID = Path(__file__).resolve().parents[1] / "grids" / "larimar.yaml"


def base_and_stream(grid: dict, edits: int, seed: int, forget_after: int = 0):
    """The grid's edit stream (with `edits` edits, forgetting `forget_after` later), encoded
    for scoring, and the base weights (trained once and cached under the grid cells' key)."""
    from forgetless.core.schema import parse
    from forgetless.experiments.base_model import load_or_train_base
    from forgetless.experiments.editing import encode_edit_stream
    from forgetless.models.causal_lm import LlamaTinyConfig, llama_tiny
    from forgetless.streams.editing import PycountryEditsConfig, pycountry_edits

    spec = {k: v for k, v in grid["streams"][0].items() if k != "name"}
    spec = {**spec, "edits": edits, "forget_after": forget_after}
    stream = pycountry_edits(parse(PycountryEditsConfig, spec, "stream"), seed)
    model_spec = {k: v for k, v in grid["model"].items() if k != "name"}
    model_config = parse(LlamaTinyConfig, model_spec, "model")
    with torch.random.fork_rng(devices=[]):  # as the runner builds a base model's init
        torch.manual_seed(0)
        model = llama_tiny(model_config, stream)
    load_or_train_base(
        model, stream.base, {"name": "llama_tiny", **dataclasses.asdict(model_config)}
    )
    stream = encode_edit_stream(stream, model)
    return stream, model_config, {k: v.clone() for k, v in model.state_dict().items()}


def build(name: str, stream, model_config, weights, params: dict):
    """A fresh base model and the editor `name` (its module imported by name, so that an
    editor not yet in the package is reported, not fatal)."""
    from forgetless.experiments.config import build_params
    from forgetless.models.causal_lm import llama_tiny
    from forgetless.strategies import STRATEGIES, TrainConfig

    importlib.import_module(f"forgetless.strategies.{name}")
    cls = STRATEGIES.get(name, "editor")
    model = llama_tiny(model_config, stream)
    model.load_state_dict(weights)
    config = build_params(cls.Config, params, f"{name} parameters")
    return cls(model, config, TrainConfig(), stream)


def smoke_grid(grid: dict) -> dict:
    """The grid at its smallest: a one-layer model on a base corpus of 12 subjects learned for
    one epoch, editors on that layer in 2 steps, Larimar's read path trained for 2 steps."""
    grid["model"].update(layers=1, hidden=32, heads=2, intermediate=64)
    stream = grid["streams"][0]
    stream.update(subjects=12, locality=4, reserve=2, base={**stream["base"], "epochs": 1})
    for entry in grid["strategies"]:
        if isinstance(entry, dict):
            entry.update(steps=2, **({"layer": 0} if "layer" in entry else {}))
            if entry["name"] == "larimar":
                entry.update(slots=8, key_steps=2, batch_size=8)
    return grid


def run_edits(editor, stream) -> dict[str, float]:
    """All edits in sequence, then the shared scores; seconds per edit over `train` alone."""
    from forgetless.experiments.evaluate import score_edits

    spent = 0.0
    for experience in stream:
        tick = time.perf_counter()
        editor.train(experience)
        spent += time.perf_counter() - tick
    _, scores = score_edits(editor, stream)
    edits = sum(len(e.train) for e in stream)
    return {
        "seconds_per_edit": spent / edits,
        "reliability": scores["reliability"],
        "generalization": scores["generalization"],
        "locality": scores["locality"],
    }


def run_forgetting(editor, stream) -> dict[str, float]:
    """The stream that forgets (edit t, forget it at t + k for even t): forget success over
    the forgotten edits, reliability over the kept ones (experiments.editing)."""
    from forgetless.experiments.editing import edit_summary
    from forgetless.experiments.evaluate import score_edits

    tick = time.perf_counter()
    for experience in stream:
        editor.train(experience)
    _, extra = score_edits(editor, stream)
    summary = edit_summary(extra, stream, time.perf_counter() - tick)
    forgotten = sum(len(e.train) for e in stream if "forgotten_at" in e.info)
    return {
        "forget_success": summary["forget_success"],
        "forgotten": forgotten,
        "kept_reliability": summary["reliability"],
        "kept_locality": summary["locality"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", default=str(GRID), help="stream, model and editor parameters")
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forget-after", type=int, default=10, help="k: forget edit t at t+k")
    parser.add_argument("--editors", default="larimar,ft_l,wise")
    parser.add_argument("--larimar", default="{}", help="Larimar parameters over the grid's")
    parser.add_argument(
        "--baselines",
        help="a log of an earlier run (same grid and edits): take the editors this run skips "
        "from its last line instead of running them again",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, 2 edits, forget after 1: seconds"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    grid = yaml.safe_load(Path(args.grid).read_text())
    if args.smoke:
        grid = smoke_grid(grid)
        args.edits, args.forget_after = 2, 1
    params = {}
    for entry in grid["strategies"]:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        params[entry.pop("name")] = entry
    params["larimar"] = {**params.get("larimar", {}), **json.loads(args.larimar)}
    stream, model_config, weights = base_and_stream(grid, args.edits, args.seed)
    results: dict[str, dict] = {}
    for name in args.editors.split(","):
        try:
            tick = time.perf_counter()
            editor = build(name, stream, model_config, weights, params.get(name, {}))
            setup = time.perf_counter() - tick
        except ImportError as e:
            log.warning("%s: not available (%s); skipped", name, e)
            continue
        results[name] = {"setup_s": setup, **run_edits(editor, stream)}
        print(name, json.dumps(results[name]), flush=True)
    baselines_from = None
    if args.baselines:
        earlier = json.loads(Path(args.baselines).read_text().strip().splitlines()[-1])
        assert earlier["edits"] == args.edits, "the earlier run edited a different number"
        for name, result in earlier["per_editor"].items():
            if name not in results and name != "larimar":
                results[name] = result
                baselines_from = args.baselines
    if "larimar" in results:
        forgetting, *_ = base_and_stream(grid, args.edits, args.seed, args.forget_after)
        editor = build("larimar", forgetting, model_config, weights, params["larimar"])
        results["larimar"].update(run_forgetting(editor, forgetting))
        print("larimar forgetting", json.dumps(results["larimar"]), flush=True)

    larimar = results.get("larimar", {})

    def speedup(other: str) -> float | None:
        if other not in results or not larimar:
            return None
        return results[other]["seconds_per_edit"] / larimar["seconds_per_edit"]

    summary = {
        "edits": args.edits,
        "speedup_vs_ft_l": speedup("ft_l"),
        "speedup_vs_wise": speedup("wise"),
        **{k: larimar.get(k) for k in ("reliability", "generalization", "locality")},
        "forget_success": larimar.get("forget_success"),
        "per_editor": results,
        "baselines_from": baselines_from,
        "larimar_params": params["larimar"],
        "smoke": args.smoke,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
