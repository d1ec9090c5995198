"""WISE: edits live in a side copy of one FFN value matrix, and a router picks the memory.

Wang et al., "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large
Language Models", NeurIPS 2024 (arXiv 2405.14768), as EasyEdit's easyeditor/models/wise
runs it. The side memory W' starts as a copy of the main memory W (one FFN output
matrix: the family's down_proj, models/families.py) and only W' learns (sec. 2.3.1).
A query uses a side memory iff its activation score Delta(x) = ||A(x) (W' - W)||,
averaged over the tokens (`score: max`: the largest token's, as EasyEdit past 100
tokens), reaches the threshold learned from the edits (Eq. 3, 6: the
smallest in-scope score seen, times `act_ratio`; an edit's score is the mean over its rows,
the prompt and its prefixed copies, as EasyEdit's save_editing_activation). Delta is
Eq. 3 as the paper writes it: EasyEdit's euc applies the model's activation to both
outputs first, ||act(A W') - act(A W)|| (SiLU for Llama), which `activated: true` does. Each edit
trains W' on the target tokens' loss plus the margin loss of Eq. 5 against irrelevant
prompts (WISE: one; `negatives` of them, the latest given), over copies of the edit behind
random prefixes. Knowledge sharding
(sec. 2.3.2): every `save_freq` edits W' is saved as a shard and reset, each shard trained
through its own random gradient mask of density `mask_ratio`; every `merge_freq` edits
the shards merge with TIES (Eq. 8). `retrieve: true` keeps each merge as its own side
memory with its own threshold (WISE-Retrieve); `false` keeps one merged memory
(WISE-Merge, the paper's main tables).

Routing is causal: the score at a position is the mean over the tokens up to it, the
sequence mean of EasyEdit's code as autoregressive decoding sees it, so the teacher-forced
score equals greedy generation (the answer never routes its own prompt). The margin loss
and the threshold read the same statistic: an edit's score is its smallest over the
positions that predict the answer, an irrelevant prompt's its largest over its tokens.
While an edit trains, W' answers only at the positions that predict the answer (EasyEdit
swaps the whole sequence): the prompt before them is shared with unrelated prompts and
routes to the main memory, and training must see what inference will.
Saved shards not merged yet are routed to like memories. Among several memories above
their thresholds, a query takes the one with the largest score (WISE-Retrieve, EasyEdit;
`select: ratio`: the largest multiple of its own threshold). Where one subject is edited in
two relations, both memories fire on the subject; the ratio then favours whichever learned
the lower threshold, while the memory trained on this very prompt usually scores it highest
(the editing benchmark's counts: docs/results.md, Lifelong editing).
`subject_scope: true` adds EasyEdit's factual-editing masks (act_mask / deact_mask of its
tokenize): a second margin term over each edit row's tokens, the subject's in scope, the
rest of the prompt out of it, so that a memory fires where a paraphrase shares the edit.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import IGNORE, trim_padding
from forgetless.models.families import (
    block_matrix,
    check_role_name,
    ffn_activation,
    in_out,
    project,
)
from forgetless.models.surgery import (
    answer_loss,
    logits_only_at,
    replace_module,
    reuse_blocks_below,
)
from forgetless.strategies.base import Strategy, register_strategy
from forgetless.streams import Example, Experience, Samples

log = logging.getLogger(__name__)

STARTERS = ("I", "You", "Because", "Yes", "Q: ")


def ties_merge(
    base: torch.Tensor, weights: list[torch.Tensor], coefficients: list[float], density: float
) -> torch.Tensor:
    """base + TIES({W_i - base}) as EasyEdit's GTA('magnitude', 'sum', normalize=True):
    keep each task vector's top `density` entries by magnitude, elect the sign of the
    weighted sum, and average the agreeing entries by their weights."""
    kept = []
    for w in weights:
        tau = w - base
        k = int(density * tau.numel())
        if k < tau.numel():
            cut = tau.abs().flatten().kthvalue(tau.numel() - k).values if k else float("inf")
            tau = torch.where(tau.abs() > cut, tau, torch.zeros_like(tau))
        kept.append(tau)
    tau = torch.stack(kept)
    coeff = torch.tensor(coefficients, dtype=tau.dtype, device=tau.device).view(-1, 1, 1)
    weighted = coeff * tau
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(tau) == sign) & (tau != 0)
    total = (weighted * agree).sum(0)
    divisor = (coeff * agree).sum(0)
    return base + total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


class SideMemory(nn.Module):
    """One FFN matrix with WISE's memories: the main W, the live side copy and saved ones.

    Weights keep the layer's own layout (`project`: (out, in) for a Linear, (in, out) for
    GPT-2's Conv1D)."""

    def __init__(
        self,
        layer: nn.Module,
        statistic: str = "mean",
        select: str = "score",
        activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.activation = activation
        self.statistic = statistic
        self.select = select
        self.side = nn.Parameter(layer.weight.detach().clone())
        self.register_buffer("mask", torch.ones_like(layer.weight, dtype=torch.bool))
        self.memories: list[torch.Tensor] = []  # merged (or saved) side memories
        self.thresholds: list[float] = []  # one per memory
        self.side_threshold = float("inf")  # of the live side memory (inf: no edit yet)
        self.editing = False
        self.scores: torch.Tensor | None = None  # while editing: Delta at every position
        self.token_scores: torch.Tensor | None = None  # while editing: each token's own norm
        self.train_positions: torch.Tensor | None = None  # while editing: where W' answers
        self.register_buffer("center", torch.zeros(in_out(layer)[0]))

    def token_score(
        self, main: torch.Tensor, change: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """||(x - c)(W' - W)|| at each token from main = x W and change = x (W' - W), with c
        the `center` (zero unless `center: true`): centring subtracts c (W' - W), one vector,
        so a memory costs one matmul, not two. With an `activation` (EasyEdit's euc),
        ||act(x W + (x - c)(W' - W)) - act(x W)||."""
        change = change - project(self.layer, self.center.to(change.dtype), delta)
        if self.activation is None:
            return change.norm(dim=-1)
        return (self.activation(main + change) - self.activation(main)).norm(dim=-1)

    def score(self, token_scores: torch.Tensor) -> torch.Tensor:
        """Delta at each position: the mean (or the largest) of the token scores so far."""
        if self.statistic == "max":
            return token_scores.cummax(dim=1).values
        positions = torch.arange(1, token_scores.shape[1] + 1, device=token_scores.device)
        return token_scores.cumsum(dim=1) / positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.layer(x)
        if self.editing:  # training: the side memory answers where routing must send the
            # answer to it (the positions that predict it), and its scores are kept
            delta = self.side - self.layer.weight
            self.token_scores = self.token_score(main, project(self.layer, x, delta), delta)
            self.scores = self.score(self.token_scores)
            new = project(self.layer, x, self.side, self.layer.bias)
            return torch.where(self.train_positions.unsqueeze(-1), new, main)
        candidates = [(self.side, self.side_threshold), *zip(self.memories, self.thresholds)]
        out, best = main, torch.full(main.shape[:-1], -1.0, device=main.device)
        for weight, threshold in candidates:
            if threshold == float("inf"):
                continue
            delta = weight.to(x.dtype) - self.layer.weight
            change = project(self.layer, x, delta)
            score = self.score(self.token_score(main, change, delta))
            key = score / threshold if self.select == "ratio" else score
            use = (score >= threshold) & (key > best)
            out = torch.where(use.unsqueeze(-1), main + change, out)
            best = torch.where(use, key, best)
        return out


@dataclass
class WiseConfig:
    layer: int = param(2, "transformer block whose matrix gets the side memory")
    module: str = param(
        "down_proj",
        "the matrix, by its Llama role (the FFN output, the paper's W_v; models/families.py); "
        "EasyEdit's GPT-2 hparams wrap up_proj (c_fc)",
    )
    lr: float = param(1.0, "learning rate of the side memory (EasyEdit: SGD at 1.0)")
    optimizer: Literal["sgd", "adam"] = param(
        "sgd", "sgd (EasyEdit) or adam, whose steps do not scale with the layer's inputs"
    )
    steps: int = param(40, "steps per edit at most (EasyEdit: 40 for GPT-2, 70 for LLaMA)")
    weight_decay: float = param(1e-5, "SGD weight decay")
    norm_constraint: float = param(1.0, "each side weight stays within this of the main one")
    act_margin: list[float] = param(
        [5.0, 20.0, 10.0], "alpha, beta, gamma of the margin loss (Eq. 5; EasyEdit llama/gpt2-xl)"
    )
    margin_weight: float = param(
        1.0, "weight of the margin loss beside the target's cross-entropy (EasyEdit: 1)"
    )
    act_ratio: float = param(0.88, "threshold = this x the smallest in-scope score of the edits")
    threshold: Literal["rows", "prompt"] = param(
        "rows",
        "an edit's in-scope score: the mean over its rows, the prompt and its prefixed "
        "copies (EasyEdit's save_editing_activation), or the prompt's alone",
    )
    prefixes: int = param(10, "random-prefix copies of each edit (0: the edit alone)")
    mask_ratio: float = param(0.2, "density of each shard's random gradient mask (rho)")
    save_freq: int = param(500, "edits per shard: then the side memory is saved and reset")
    merge_freq: int = param(1000, "edits per merge of the saved shards (TIES)")
    density: float = param(0.53, "TIES: share of each shard's largest changes kept")
    retrieve: bool = param(False, "keep every merge as its own side memory (WISE-Retrieve)")
    negatives: int = param(
        1,
        "irrelevant prompts per edit, the latest given (its own loc_prompts first, then "
        "earlier edits'); WISE: 1",
    )
    subject_scope: bool = param(
        False,
        "EasyEdit's factual editing (act_mask): the margin loss also asks each edit row's "
        "subject tokens to score above beta and its other tokens below alpha, so that a "
        "memory fires on the subject a paraphrase shares, not on the edit's template",
    )
    score: Literal["mean", "max"] = param(
        "mean",
        "Delta over the tokens so far: their mean (WISE) or the largest token's (EasyEdit's "
        "top-1, which it takes past 100 tokens), which the template around a subject does "
        "not dilute",
    )
    select: Literal["score", "ratio"] = param(
        "score",
        "among memories above their thresholds, the one with the largest score (WISE-Retrieve) "
        "or the largest multiple of its threshold",
    )
    center: bool = param(
        False,
        "score (x - c)(W' - W) with c the mean layer input over the first edit's rows: small "
        "models' inputs share one large direction that no margin can separate (not in WISE)",
    )
    activated: bool = param(
        False,
        "score ||act(x W') - act(x W)|| with the model's FFN activation (SiLU for Llama), as "
        "EasyEdit's euc does; the paper's Eq. 3 has no activation",
    )

    def validate(self, where: str) -> None:
        for name in ("lr", "steps", "act_ratio", "save_freq", "merge_freq", "negatives"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.layer < 0:
            raise ConfigError(f"{where}.layer: must be >= 0, got {self.layer}")
        if len(self.act_margin) != 3:
            raise ConfigError(f"{where}.act_margin: three numbers, got {self.act_margin}")
        for name in ("mask_ratio", "density"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{where}.{name}: must be in (0, 1]")
        if self.merge_freq % self.save_freq:
            raise ConfigError(f"{where}.merge_freq: must be a multiple of save_freq")
        check_role_name(self.module, f"{where}.module")


@register_strategy("wise")
class Wise(Strategy):
    """WISE: side memory, activation routing, margin loss, sharding and TIES merging."""

    Config = WiseConfig
    supports = ("edit",)
    resumable = False  # memories are a list of tensors beside the model: a retry restarts

    reads_positions = True  # its wrapper reads the matrix's input per sequence and position

    @staticmethod
    def model_roles(config: WiseConfig) -> tuple[str, ...]:
        return (config.module,)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        layer = block_matrix(
            self.model, self.config.layer, self.config.module, "strategy.layer", positions=True
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        activation = ffn_activation(self.model) if self.config.activated else None
        self.memory = SideMemory(layer, self.config.score, self.config.select, activation)
        replace_module(self.model, layer, self.memory)
        self.edits = 0
        self.live_min = float("inf")  # smallest in-scope score of the live memory's edits
        self.shards: list[tuple[torch.Tensor, float]] = []  # (weight, its min score)
        self.merged: list[float] = []  # min score of each merged memory
        self.context: list[str] | None = None
        self.unrelated = deque(maxlen=self.config.negatives)  # the latest irrelevant prompts

    def train(self, experience: Experience) -> None:
        self.model.eval()
        if self.context is None:
            self.context = self.random_prefixes()
        for request in experience.train:
            self.unrelated.extend(
                request.loc_prompts or [self.context[self.edits % len(self.context)]]
            )
            self.edit(request.prompt, request.target, list(self.unrelated), request.subject)

    def random_prefixes(self) -> list[str]:
        """EasyEdit's context templates: greedy continuations of 5 and 10 tokens of a few
        starters (the paper: random sequences of 10 tokens); each edit is also trained
        behind each of them, so that Delta rises with the edit, not with its position.
        A base that only ever wrote short answers ends them at once, so the starters stay
        nearly bare ("I", "You26"); forcing 5 to 40 tokens out of the pycountry base (code
        strings such as "IS888BVPV") made 10 edits hold worse, not better."""
        if not self.config.prefixes:
            return ["Yes"]
        short = self.model.generate(list(STARTERS), max_new_tokens=5)
        long = self.model.generate(list(STARTERS), max_new_tokens=10)
        texts = [s + t for s, t in zip(STARTERS * 2, short + long)]
        return [t.replace("{", " ").replace("}", " ").strip() for t in texts][
            : self.config.prefixes
        ]

    def edit_batch(self, prompt: str, target: str, irrelevant: list[str], subject: str = ""):
        """Rows: the edit alone and behind each prefix (target labelled), then the
        irrelevant prompts (no labels); masks of the positions that predict the answer
        (edit rows) and of the irrelevant prompts' tokens, and of the subject's tokens in
        the edit rows (none without a subject)."""
        prompts = [prompt] + [f"{p}. {prompt}" for p in self.context[: self.config.prefixes]]
        rows = [Example(p, target) for p in prompts] + [Example(p, "") for p in irrelevant]
        batch = self.model.encode(rows)
        batch.y[len(prompts) :] = IGNORE
        batch = trim_padding(Samples(batch.x, batch.y))
        answer = torch.zeros_like(batch.y, dtype=torch.bool)
        answer[:, :-1] = batch.y[:, 1:] != IGNORE
        for row, text in enumerate(irrelevant, start=len(prompts)):
            tokens = self.model.tokenizer(text, add_special_tokens=False).input_ids
            answer[row, : len(tokens)] = True
        subject_ids = self.model.tokenizer(subject, add_special_tokens=False).input_ids
        in_subject, in_template = torch.zeros_like(answer), torch.zeros_like(answer)
        for row in range(len(prompts) if subject_ids else 0):
            start = find_sublist(batch.x[row].tolist(), subject_ids)
            if start is not None:
                in_subject[row, start : start + len(subject_ids)] = True
                in_template[row] = (batch.y[row] == IGNORE) & (batch.x[row] != self.model.pad_id)
        in_template &= ~in_subject
        masks = (answer, in_subject, in_template)
        return batch.to(self.device), *(m.to(self.device) for m in masks)

    def edit(self, prompt: str, target: str, irrelevant: list[str], subject: str = "") -> None:
        cfg, memory = self.config, self.memory
        if self.edits % cfg.save_freq == 0:  # a new shard: a new random gradient mask
            memory.mask = torch.rand(memory.mask.shape, device=self.device) < cfg.mask_ratio
        batch, positions, in_subject, in_template = self.edit_batch(
            prompt, target, irrelevant, subject if cfg.subject_scope else ""
        )
        if cfg.center and self.edits == 0:
            self.set_center(batch)
        make = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
        optimizer = make([memory.side], lr=cfg.lr, weight_decay=cfg.weight_decay)
        main = memory.layer.weight.detach()
        alpha, beta, gamma = cfg.act_margin
        memory.editing = True
        memory.train_positions = positions.clone()
        edit_rows = len(positions) - len(irrelevant)
        memory.train_positions[edit_rows:] = False  # the irrelevant prompts: main memory
        previous = None
        with reuse_blocks_below(self.model, cfg.layer):
            for step in range(cfg.steps):
                ce = answer_loss(self.model, batch.x, batch.y)  # the edit rows' labels
                inside, outside = _in_and_out_of_scope(memory.scores, positions, edit_rows)
                margin = _margin_loss(inside, outside, alpha, beta, gamma)
                if in_subject.any():
                    subject = _masked_mean(memory.token_scores, in_subject)
                    template = _masked_mean(memory.token_scores, in_template)
                    margin = margin + _margin_loss(subject, template, alpha, beta, gamma)
                loss = ce + cfg.margin_weight * margin
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("wise edit %d step %d: ce %.4f margin %.4f in-scope %.2f out %.2f",
                              self.edits, step, ce.item(), margin.item(), inside.min().item(),
                              outside.max().item() if len(outside) else 0.0)  # fmt: skip
                if (
                    previous is not None
                    and abs(previous - loss.item()) <= 1e-4
                    and loss.item() <= 0.02
                ):
                    break
                previous = loss.item()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                memory.side.grad.mul_(memory.mask)
                optimizer.step()
                with torch.no_grad():
                    eps = cfg.norm_constraint
                    memory.side.copy_(torch.clamp(memory.side, main - eps, main + eps))
            with torch.no_grad(), logits_only_at(self.model, torch.zeros_like(positions)):
                self.model(batch.x)  # only the side memory's scores are read
                inside, _ = _in_and_out_of_scope(memory.scores, positions, edit_rows)
                score = inside.mean() if cfg.threshold == "rows" else inside[0]
                self.live_min = min(self.live_min, score.item())
        memory.editing = False
        memory.side_threshold = self.live_min * cfg.act_ratio
        log.debug("wise edit %d: %d steps, in-scope score %.3f, threshold %.3f", self.edits,
                  step + 1, score, memory.side_threshold)  # fmt: skip
        self.edits += 1
        if self.edits % cfg.save_freq == 0:
            self.save_shard()
        if self.edits % cfg.merge_freq == 0:
            self.merge()

    @torch.no_grad()
    def set_center(self, batch: Samples) -> None:
        """The mean input of the layer over the real tokens of the first edit's rows."""
        seen = []
        hook = self.memory.layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        self.model(batch.x)
        hook.remove()
        real = batch.x != self.model.pad_id
        self.memory.center.copy_(seen[0][real].mean(dim=0))

    @torch.no_grad()
    def save_shard(self) -> None:
        """The live side memory becomes a shard (routed to until merged) and is reset."""
        memory = self.memory
        self.shards.append((memory.side.detach().clone(), self.live_min))
        memory.memories.append(self.shards[-1][0])
        memory.thresholds.append(self.live_min * self.config.act_ratio)
        memory.side.copy_(memory.layer.weight)
        memory.side_threshold, self.live_min = float("inf"), float("inf")

    @torch.no_grad()
    def merge(self) -> None:
        """TIES over the saved shards (Eq. 8): one more memory (retrieve) or the one merged
        memory, which takes 0.6 of the previous merge and 0.4 / k of each new shard."""
        memory, cfg = self.memory, self.config
        weights = [w for w, _ in self.shards]
        scores = [s for _, s in self.shards]
        del memory.memories[len(self.merged) :], memory.thresholds[len(self.merged) :]
        if self.merged and not cfg.retrieve:
            weights = [memory.memories.pop(), *weights]
            memory.thresholds.pop()
            coefficients = [0.6] + [0.4 / len(self.shards)] * len(self.shards)
            scores.append(self.merged.pop())
        else:
            coefficients = [1.0 / len(weights)] * len(weights)
        merged = ties_merge(memory.layer.weight.detach(), weights, coefficients, cfg.density)
        self.merged.append(min(scores))
        memory.memories.append(merged)
        memory.thresholds.append(min(scores) * cfg.act_ratio)
        self.shards = []

    def memory_bytes(self) -> int:
        memory = self.memory
        tensors = [memory.side, memory.mask, *memory.memories]
        return sum(t.numel() * t.element_size() for t in tensors)


def _in_and_out_of_scope(scores: torch.Tensor, positions: torch.Tensor, edit_rows: int):
    """Each edit row's smallest score where it predicts the answer, and each irrelevant
    row's largest over its tokens: what routing must put above and below the threshold."""
    edits, unrelated = slice(None, edit_rows), slice(edit_rows, None)
    inside = scores[edits].masked_fill(~positions[edits], float("inf")).min(dim=1).values
    outside = scores[unrelated].masked_fill(~positions[unrelated], float("-inf")).max(dim=1).values
    return inside, outside


def _margin_loss(inside, outside, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """Eq. 5 as EasyEdit: in-scope scores above beta, out-of-scope below alpha, every pair
    apart by gamma."""
    return (
        _positive_mean(outside - alpha)
        + _positive_mean(beta - inside)
        + _positive_mean(gamma - (inside[:, None] - outside[None, :]))
    )


def _masked_mean(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row with any masked token, the mean score over them (EasyEdit's act_mask)."""
    rows = mask.any(dim=1)
    weights = mask[rows].to(scores.dtype)
    return (scores[rows] * weights).sum(1) / weights.sum(1)


def find_sublist(items: list[int], sub: list[int]) -> int | None:
    """Where `sub` first starts in `items`, None if nowhere."""
    for start in range(len(items) - len(sub) + 1):
        if items[start : start + len(sub)] == sub:
            return start
    return None


def _positive_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries of a hinge (EasyEdit), 0 when none is positive."""
    positive_part = x.clamp(min=0)
    count = (positive_part > 0).sum()
    return positive_part.sum() / count.clamp(min=1)
