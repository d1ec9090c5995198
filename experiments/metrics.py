"""Continual-learning metrics as pure functions of the accuracy matrix.

R[i][j] is the score on experience j after training through experience i (0-based
here; T experiences), b[j] the score of the untrained model on experience j.

Two libraries call different things "forgetting". `forgetting` is the drop from the
best score ever reached (Chaudhry et al. 2018; Mammoth); Avalanche's stream
forgetting is the drop from the score right after training, which equals `-bwt`.
They differ whenever a task improves after its own experience; both are logged.
"""

from __future__ import annotations

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"accuracy matrix must be T x T, got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    """A_T = (1/T) sum_j R[T][j]."""
    return float(_matrix(R)[-1].mean())


def average_accuracy_after(R, i: int) -> float:
    """A_i over the experiences seen so far: mean of R[i][0..i] (the per-step `avg_acc`)."""
    return float(_matrix(R)[i, : i + 1].mean())


def learning_accuracy(R) -> float:
    """Plasticity: (1/T) sum_j R[j][j]."""
    return float(np.diag(_matrix(R)).mean())


def forgetting(R) -> float:
    """F = 1/(T-1) sum_{j<T} (max_{l<T} R[l][j] - R[T][j]); 0 for one experience."""
    R = _matrix(R)
    if len(R) < 2:
        return 0.0
    best = R[:-1, :-1].max(axis=0)
    return float((best - R[-1, :-1]).mean())


def backward_transfer(R) -> float:
    """BWT = 1/(T-1) sum_{j<T} (R[T][j] - R[j][j]); Avalanche's stream forgetting is -BWT."""
    R = _matrix(R)
    if len(R) < 2:
        return 0.0
    return float((R[-1, :-1] - np.diag(R)[:-1]).mean())


def forward_transfer(R, baseline) -> float:
    """FWT = 1/(T-1) sum_{j>=2} (R[j-1][j] - b[j]) (Lopez-Paz & Ranzato, 2017)."""
    R = _matrix(R)
    b = np.asarray(baseline, dtype=float)
    if b.shape != (len(R),):
        raise ValueError(f"baseline must hold T={len(R)} scores, got shape {b.shape}")
    if len(R) < 2:
        return 0.0
    before = np.array([R[j - 1, j] for j in range(1, len(R))])
    return float((before - b[1:]).mean())


def summarize(R, baseline) -> dict[str, float]:
    """Every final metric of DESIGN.md, keyed as logged (without the `final/` prefix)."""
    return {
        "avg_acc": average_accuracy(R),
        "learning_acc": learning_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, baseline),
    }
