"""Edit scoring: reliability, generalization and locality, one place for every editor.

- reliability: the edit prompt gives the new target;
- generalization: the edit's paraphrases give the new target;
- locality: prompts about facts no edit touches give the model's own answers, greedy
  answers cached once before the first edit (`cache_locality`); a prompt that comes with
  its dataset answer (`LocalityPair`: ZsRE's loc/loc_ans, CounterFact's neighborhood
  prompts) is scored as EasyEdit scores it, the answer teacher-forced and each of its
  tokens compared with the model's pre-edit prediction there (token accuracy is then
  EasyEdit's locality, exact match asks every token to keep its prediction).

Exact match is the primary score (the whole answer and its EOS are the greedy output,
measured with one teacher-forced pass as in experiments.evaluate). Token accuracy,
EasyEdit's teacher-forced per-token score (`test_prediction_acc`), is reported beside
it; on short targets it is inflated by tokens any answer shares (EOS, a leading space).
R[i][j] is the reliability of experience j's edits after experience i: the
edit-retention matrix.

In a stream that forgets (`forget_after`), forget success is the exact match of a
forgotten edit's prompt against the model's own pre-edit greedy answer (cached like the
locality answers), and the final reliability and generalization cover the edits kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from forgetless.models.causal_lm import IGNORE, CausalLM
from forgetless.streams import Example, Samples, Stream
from forgetless.streams.editing import LocalityPair

SCORES = ("reliability", "generalization")


@dataclass
class EditSets:
    """An experience's edits as token ids: its prompts and its paraphrases, new targets."""

    reliability: Samples
    generalization: Samples
    edits: int
    pre_edit: Samples | None = None  # the prompts' pre-edit answers, for edits to be forgotten

    def __len__(self) -> int:
        return self.edits


@torch.no_grad()
def cache_locality(model: CausalLM, prompts: list[Example], max_new_tokens: int = 16) -> Samples:
    """The model's own greedy answers to the locality prompts (call before any edit), as
    token ids: prompt + the generated tokens through the first EOS, labels on the latter.

    Ids, not decoded text: text re-encoded need not give the same tokens, and an answer
    with no EOS within `max_new_tokens` must be scored without one."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, rows, labels = model.tokenizer.eos_token_id, [], []
    for e in prompts:
        ids = model.tokenizer(e.prompt, add_special_tokens=False).input_ids
        if isinstance(e, LocalityPair):  # EasyEdit's: the pre-edit argmax at each answer token
            row = ids + model.tokenizer(e.answer, add_special_tokens=False).input_ids
            logits = model(torch.tensor([row], device=device))[0, len(ids) - 1 : len(row) - 1]
            rows.append(row)
            labels.append([IGNORE] * len(ids) + logits.argmax(dim=-1).tolist())
            continue
        out = model.model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.pad_id,
            eos_token_id=eos,
        )[0, len(ids) :].tolist()  # fmt: skip
        answer = out[: out.index(eos) + 1] if eos in out else out
        rows.append(ids + answer)
        labels.append([IGNORE] * len(ids) + answer)
    model.train(was_training)
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), model.pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        x[i, : len(r)], y[i, : len(lab)] = torch.tensor(r), torch.tensor(lab)
    return Samples(x, y)


def encode_edit_stream(stream: Stream, model: CausalLM) -> Stream:
    """Every experience's `test` as EditSets and `general` as the locality set with the
    model's own answers: the runner calls this once, after the base model is loaded."""
    texts = [Example(p, r.target) for e in stream for r in e.train
             for p in (r.prompt, *r.paraphrases)]  # fmt: skip
    width = model.width(texts)
    experiences = []
    for e in stream:
        reliability = [Example(r.prompt, r.target) for r in e.train]
        generalization = [Example(p, r.target) for r in e.train for p in r.paraphrases]
        forgotten = "forgotten_at" in e.info
        test = EditSets(
            model.encode(reliability, width),
            model.encode(generalization or reliability, width),
            len(e.train),
            cache_locality(model, reliability) if forgotten else None,
        )
        experiences.append(dataclasses.replace(e, test=test))
    return dataclasses.replace(
        stream, experiences=experiences, general=cache_locality(model, list(stream.general))
    )


def applied_scores(R: np.ndarray, i: int, extra: dict[str, float], stream: Stream) -> dict:
    """Reliability and generalization over the edits held after experience `i` (applied
    and not forgotten; experiences hold equal numbers of edits), locality, and forget
    success over the edits forgotten so far: the per-step curves."""
    forgotten_at = [e.info.get("forgotten_at", len(stream)) for e in stream.experiences]
    held = [j for j in range(i + 1) if forgotten_at[j] > i]
    forgotten = [j for j in range(i + 1) if forgotten_at[j] <= i]
    scores = {
        "reliability": float(np.mean(R[i, held])),
        "generalization": float(np.mean([extra[f"generalization/exp_{j}"] for j in held])),
        "locality": extra["locality"],
        "edits_applied": float(sum(len(e.train) for e in stream.experiences[: i + 1])),
    }
    if forgotten:
        scores["forget_success"] = float(np.mean([extra[f"forget/exp_{j}"] for j in forgotten]))
    return scores


def edit_summary(extra: dict[str, float], stream: Stream, train_time_s: float) -> dict:
    """final/reliability, generalization, locality over all T edits; latency per edit."""
    edits = sum(len(e.train) for e in stream)
    keys = [f"{s}{k}" for s in (*SCORES, "locality") for k in ("", "_token_acc")]
    summary = {**{k: extra[k] for k in keys}, "edit_latency_s": train_time_s / edits}
    forgotten = [v for k, v in extra.items() if k.startswith("forget/exp_")]
    if forgotten:
        summary["forget_success"] = float(np.mean(forgotten))
    return summary
