"""Title noise for the robustness test (paper Table 5): titles that no longer name the label, or that
belong to another product. Pure functions over lists of strings, so the same noise can be applied to any
test split and checked in isolation. The word removal is the one training uses (cmaclip/corruption.py).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from cmaclip.corruption import Labels, label_words, remove_words


def remove_label_words(titles: Sequence[str | None], labels: Sequence[Labels]) -> list[str]:
    """Each title with every word of its label phrase(s) removed: case-insensitive, whole words only.

    `labels[i]` is one phrase or a list of phrases (one per task; None = unknown, nothing removed).
    Whole words only, so removing `Red` leaves `Reddish` and `Tan` leaves `Tank` intact. A null title
    becomes the empty string, which is what the tokenizer sees for it anyway."""
    if len(titles) != len(labels):
        raise ValueError(f"{len(titles)} titles but {len(labels)} label entries")
    return [remove_words(t or "", label_words(lab)) for t, lab in zip(titles, labels)]


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


def names_label(titles: Sequence[str | None], labels: Sequence[str | None]) -> np.ndarray:
    """True where the title contains the whole label phrase (case-insensitive, whole words)."""
    out = np.zeros(len(titles), dtype=bool)
    for i, (title, label) in enumerate(zip(titles, labels)):
        if title and label:
            pattern = rf"(?<!\w){re.escape(str(label))}(?!\w)"
            out[i] = re.search(pattern, str(title), flags=re.IGNORECASE) is not None
    return out
