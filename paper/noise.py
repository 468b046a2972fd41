"""Title swapping for the robustness test (paper Table 5): titles that belong to another product. Pure
functions over lists, so the same noise can be applied to any test split and checked in isolation. The
other noise, titles that no longer name the label, is the word removal training uses
(`cmaclip.corruption.remove_label_words`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def swap_titles(titles: Sequence[str | None], seed: int) -> list[str | None]:
    """The titles permuted so that no product keeps its own title (a derangement), reproducible by seed.

    Built as one random cycle through all products, which is a derangement for any n >= 2. Two products
    can share the same title text, so a product may still receive an identical string; that is the data,
    not a fixed point of the permutation."""
    n = len(titles)
    if n < 2:
        raise ValueError("swapping titles needs at least two products")
    order = np.random.default_rng(seed).permutation(n)
    donor = np.empty(n, dtype=np.int64)
    donor[order] = np.roll(order, -1)  # product order[i] gets the title of order[i + 1]
    return [titles[j] for j in donor]


def swap_permutation(n: int, seed: int) -> np.ndarray:
    """The donor index of `swap_titles(range(n), seed)`: product i receives the title of donor[i]."""
    return np.asarray(swap_titles(list(range(n)), seed), dtype=np.int64)
