"""Title corruption while a stage trains: on some samples the title says nothing (or something wrong), so
the image path and the modality attention must learn to carry the prediction.

Per training sample at most one policy applies, chosen by one uniform draw, each with its own probability
(config.StageConfig):

    drop_title          the title becomes ""
    remove_label_words  every word of the sample's own labels (of `label_word_tasks`, default every task)
                        is deleted: the title keeps its other words but no longer names the answer
    swap_title          the title of another product of the same pool (the split, or the streamed row group)

Deterministic without touching the global RNGs: each sample's draws come from its own generator, seeded by
(seed, stage, epoch, product id), so any number of DataLoader workers or DDP ranks corrupts the same titles,
and a stage without corruption consumes exactly the random numbers it did before.

The word removal is also the paper protocol's robustness test (paper/experiments.py), and `names_label` the
check that the training plots and the protocol share: one definition of "the title names the label".
"""
from __future__ import annotations

import random
import re
from typing import Mapping, Sequence

import numpy as np

from .config import TITLE_POLICIES, StageConfig

Labels = str | Sequence[str | None] | None


def label_words(labels: Labels) -> list[str]:
    """Every word of every label phrase of one product (`Navy Blue` -> `Navy`, `Blue`)."""
    if labels is None:
        return []
    phrases = [labels] if isinstance(labels, str) else [p for p in labels if p]
    return [w for phrase in phrases for w in str(phrase).split()]


def _whole(phrases: Sequence[str]) -> str:
    """A pattern matching any of the phrases as whole words, literally (longest first)."""
    alternatives = "|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True))
    # Lookarounds instead of \b: a label word may start or end with a non-word character ("T-Shirt").
    return rf"(?<!\w)(?:{alternatives})(?!\w)"


def remove_label_words(title: str | None, labels: Labels) -> str:
    """The title with every word of the product's label phrase(s) removed (`labels`: one phrase, or one per
    task with None where unknown): case-insensitive, whole words only (removing `Red` leaves `Reddish`),
    whitespace collapsed. A null title becomes the empty string, which is what the tokenizer sees for it."""
    words, title = label_words(labels), title or ""
    if not words:
        return title
    return " ".join(re.sub(_whole(words), " ", title, flags=re.IGNORECASE).split())


def names_label(titles: Sequence[str | None], labels: Sequence[str | None]) -> np.ndarray:
    """True where the title contains the whole label phrase (case-insensitive, whole words)."""
    return np.array([bool(title and label and re.search(_whole([str(label)]), str(title), flags=re.IGNORECASE))
                     for title, label in zip(titles, labels)], dtype=bool)


def sample_rng(seed: int, stage: str, epoch: int, product_id: str, stream: str) -> random.Random:
    """A sample's own generator. `stream` keeps title and image draws apart, so enabling one kind of change
    leaves the other's draws as they were. (String seeds are hashed with SHA-512: stable across processes.)"""
    return random.Random(f"{stream}/{seed}/{stage}/{epoch}/{product_id}")


def choose_policy(stage: StageConfig, rng: random.Random) -> str | None:
    """Which policy corrupts this sample, or None (probability 1 - the policies' sum)."""
    u = rng.random()
    for name in TITLE_POLICIES:
        p = getattr(stage, name)
        if u < p:
            return name
        u -= p
    return None


def corrupt_title(title: str | None, labels: Mapping[str, str | None], stage: StageConfig, rng: random.Random,
                  pool: Sequence[str | None], position: int) -> str:
    """One training sample's title after the stage's corruption. `labels`: the sample's raw label per task;
    `pool[position]` is this sample's title, the other entries are the titles a swap may take."""
    title = title or ""
    policy = choose_policy(stage, rng)
    if policy == "drop_title":
        return ""
    if policy == "remove_label_words":
        tasks = stage.label_word_tasks or list(labels)
        return remove_label_words(title, [labels[t] for t in tasks])
    if policy == "swap_title":
        if len(pool) < 2:  # a pool of one product has no other title to give
            return ""
        donor = rng.randrange(len(pool) - 1)
        return pool[donor + (donor >= position)] or ""
    return title
