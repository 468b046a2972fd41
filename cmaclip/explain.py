"""What each modality contributes to a prediction, measured by withholding it.

λ (equation 6) is not that measure: it weighs I' and T', but sequence attention has already mixed both
modalities into each of them, so λ says which *embedding* the head reads, not which *input* decided. Its
value also depends on the training run (0.93 for colour after one protocol run, 0.0005 after a shorter one
of the same config). What holds across trainings is what the model does without an input:

    title contribution = p(ŷ | image, title) - p(ŷ | image, no title)
    image contribution = p(ŷ | image, title) - p(ŷ | blank image, title)

ŷ is the prediction from both inputs. "No title" is the empty title (the start and end tokens only);
a "blank image" is all zeros after normalization, i.e. every pixel at the mean colour CLIP normalizes by.
A contribution near 0 means the prediction does not need that input; a large positive one means it rests
on it. Three forward passes per batch instead of one, so scoring computes them only when asked.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .config import MODALITIES
from .model import CMACLIP
from .transforms import eot_index, trim_tokens


def empty_titles(text: torch.Tensor) -> torch.Tensor:
    """The token ids of the empty title, for a batch of tokenized titles: start token, end token, padding."""
    rows = torch.arange(text.shape[0], device=text.device)
    empty = torch.zeros_like(text)
    empty[:, 0], empty[:, 1] = text[:, 0], text[rows, eot_index(text)]
    return empty


def withheld_inputs(model: CMACLIP, images: torch.Tensor | None,
                    text: torch.Tensor | None) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(images, text) with one modality withheld, for each modality the model reads."""
    inputs = {}
    if model.use_text:
        inputs["title"] = (images, empty_titles(text))
    if model.use_image:
        inputs["image"] = (torch.zeros_like(images), text)
    return inputs


def contributions(full: dict[str, torch.Tensor],
                  withheld: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """From the logits on both inputs (task -> [B, classes]) and on `withheld_inputs` (modality -> task ->
    logits): per task `prediction`, `confidence` and each modality's contribution, all [B]. A modality
    absent from `withheld` (the model does not read it) contributes 0."""
    out = {}
    for task, logits in full.items():
        confidence, prediction = logits.float().softmax(-1).max(-1)
        out[task] = {"prediction": prediction, "confidence": confidence}
        for modality in MODALITIES:
            if modality not in withheld:
                out[task][modality] = torch.zeros_like(confidence)
                continue
            without = withheld[modality][task].float().softmax(-1).gather(1, prediction[:, None])[:, 0]
            out[task][modality] = confidence - without
    return out


@torch.no_grad()
def modality_contributions(model: CMACLIP, images: torch.Tensor | None,
                           text: torch.Tensor | None) -> dict[str, dict[str, torch.Tensor]]:
    """`contributions` of one batch: three forward passes (two for a one-modality model)."""
    full = model(images, text).logits
    withheld = {m: model(*inputs).logits for m, inputs in withheld_inputs(model, images, text).items()}
    return contributions(full, withheld)


def mean_contributions(model: CMACLIP, batches: Iterable[dict],
                       device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Per task, each modality's contribution averaged over every sample of `batches` (labels not needed).
    The model should be in eval mode: dropout would otherwise differ between the three passes."""
    sums: dict[str, dict[str, float]] = {}
    n = 0
    for batch in batches:
        parts = modality_contributions(model, batch["images"].to(device), trim_tokens(batch["text"]).to(device))
        for task, values in parts.items():
            totals = sums.setdefault(task, dict.fromkeys(MODALITIES, 0.0))
            for modality in MODALITIES:
                totals[modality] += float(values[modality].sum())
        n += len(batch["product_id"])
    return {task: {m: total / max(n, 1) for m, total in totals.items()} for task, totals in sums.items()}
