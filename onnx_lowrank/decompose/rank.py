"""Rank from a singular-value spectrum: the smallest rank that keeps an energy or an error."""

from __future__ import annotations

import numpy as np


def rank_for_energy(spectrum: np.ndarray, energy: float) -> int:
    """Smallest k with sum(s[:k]^2) >= energy * sum(s^2); at least 1."""
    power = np.cumsum(np.asarray(spectrum, np.float64) ** 2)
    if power.size == 0 or power[-1] == 0:
        return 1
    return int(min(np.searchsorted(power, energy * power[-1] * (1 - 1e-12)) + 1, power.size))


def rank_for_error(spectrum: np.ndarray, max_error: float) -> int:
    """Smallest k whose truncation error ||s[k:]|| / ||s|| is at most max_error; at least 1."""
    return rank_for_energy(spectrum, 1.0 - max_error**2)
