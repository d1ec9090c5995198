"""Networks for image streams, and the step that lets any model read uint8 pixels.

Image streams hold uint8 pixels (a quarter of float32, moved to the device as such);
`scale_pixels` makes a model turn them into floats in [0, 1] on entry, so replay buffers,
the evaluator and avalanche-lib all pass pixels through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from forgetless.streams import Stream


def holds_pixels(stream: Stream) -> bool:
    """Whether the stream's inputs are uint8 pixels."""
    first = stream.experiences[0].train if stream.experiences else None
    dtype = getattr(getattr(first, "x", None), "dtype", None) or getattr(first, "dtype", None)
    return dtype == torch.uint8


def _to_unit_range(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
        return (x.float().div_(255), *args[1:])
    return None


def scale_pixels(model: nn.Module) -> nn.Module:
    """Make `model` take uint8 pixels: a forward pre-hook scales them to [0, 1] floats.

    On a Sequential it sits on the first block, so a model split for latent replay keeps it
    in its lower part. The state dict is unchanged; float inputs pass through as they are.
    """
    first = model[0] if isinstance(model, nn.Sequential) and len(model) else model
    first.register_forward_pre_hook(_to_unit_range)
    return model
