"""Cell checkpoints after every experience: strategy state, RNG states and the matrix so far.

Saved with torch.save and loaded with weights_only=True: only tensors and plain values,
never arbitrary pickles. Written to a temporary file and renamed, so a worker killed
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import torch

from forgetless.core.schema import ConfigError


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """The one place every RNG is seeded from the cell seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def save(location: str, state: dict[str, Any]) -> None:
    """Write atomically to a local path or a URI (s3://, gs://, ... through pyarrow.fs).

    The temporary file is named for this writer: two drivers probing one storage at once
    must not rename each other's file away."""
    suffix = f".{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    if "://" in location:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path + suffix) as out:
            out.write(buffer.getvalue())
        fs.move(path + suffix, path)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    torch.save(state, tmp)
    os.replace(tmp, path)


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint file that exists but cannot be read (truncated, or not a checkpoint)."""


def load(location: str) -> dict[str, Any] | None:
    """The checkpoint on CPU, or None (RNG states must be CPU tensors; strategies move the rest).

    Raises UnreadableCheckpoint, naming the file, for one that exists but does not load.
    """
    try:
        if "://" in location:
            fs, path = pyarrow.fs.FileSystem.from_uri(location)
            if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
                return None
            with fs.open_input_stream(path) as stream:
                data = io.BytesIO(stream.read())
            return torch.load(data, map_location="cpu", weights_only=True)
        if not Path(location).exists():
            return None
        return torch.load(location, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise UnreadableCheckpoint(f"checkpoint {location} is unreadable ({e})") from e


def set_aside(location: str, suffix: str) -> str:
    """Rename a checkpoint that must not be resumed to `<location>.<suffix>`, for a look."""
    target = f"{location}.{suffix}"
    if "://" in location:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        fs.move(path, pyarrow.fs.FileSystem.from_uri(target)[1])
    else:
        os.replace(location, target)
    return target


def remove(location: str) -> None:
    if "://" in location:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_file(path)
    else:
        Path(location).unlink(missing_ok=True)


def check_writable(storage: str) -> None:
    """Raise ConfigError unless a checkpoint can be written under `storage`."""
    probe = f"{storage.rstrip('/')}/.forgetless-probe"
    try:
        save(probe, {"probe": 1})
        remove(probe)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ConfigError(
            f"storage: cannot write checkpoints under {storage!r} ({e}); choose a writable "
            "folder or a URI the workers can reach (e.g. s3://bucket/forgetless)"
        ) from e
