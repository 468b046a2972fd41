"""Catalog pre-training, the optional `align` stage before warm-up: CLIP's contrastive loss (open_clip's
`ClipLoss`) over the catalog's (image, title) pairs, and image-to-title retrieval to validate it.

Catalogs hold far more unlabelled products than labelled ones, and public CLIP weights have never seen
them; align uses every training row with a title, labelled or not, and touches nothing but the towers and
the temperature, so warm-up starts from aligned towers and the CMA modules' initial weights.

Choices, and why:
- The contrastive batch is the micro-batch, on any number of ranks: no `ClipLoss` gather. The trainer
  averages the loss over accumulated micro-batches and DDP averages gradients over ranks, so a DDP run
  optimises exactly what one process does with accumulation (gathering would tie the loss to the world
  size, and needs equal batch sizes on every rank, which dropping untitled rows breaks).
- A pair without a title (null or empty: nothing between start and end of text) is left out of the loss
  and of retrieval; a micro-batch with none left still runs backward, with a zero loss, so DDP's gradient
  synchronisation never waits for a rank that skipped.
- Retrieval recall is measured over pools of at most RETRIEVAL_POOL pairs (see `retrieval_recall`), so the
  figure means the same on a catalog of any size and memory stays bounded.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from open_clip.loss import ClipLoss
from torch import nn

from .clip_baseline import embed, logit_scale
from .evaluate import _restore_modes
from .model import CMACLIP
from .precision import autocast
from .transforms import eot_index, trim_tokens

RETRIEVAL_POOL = 1000
RECALL_AT = (1, 5)
MONITOR = "image_to_title_recall_at_1"   # align's best epoch: this, then recall@5, then the lower loss


def has_title(text: torch.Tensor) -> torch.Tensor:
    """[B] bool: the token ids hold at least one token between start and end of text."""
    return eot_index(text) > 1


class ContrastiveTowers(nn.Module):
    """What align trains, as one module (what DDP wraps): normalised pooled image and title embeddings
    (CLIP's `encode_image` / `encode_text`) and the temperature, from a CMA-CLIP model's towers."""

    def __init__(self, model: CMACLIP):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, text: torch.Tensor):
        image, title = embed(self.model.towers, images, text)
        return image, title, logit_scale(self.model.towers)


def contrastive_loss(image: torch.Tensor, title: torch.Tensor, scale: torch.Tensor,
                     keep: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (`ClipLoss`) over the pairs `keep` selects (those with a title)."""
    if not bool(keep.any()):
        return (image.sum() + title.sum() + scale) * 0.0  # reaches every parameter: DDP sees them all
    return ClipLoss()(image[keep].float(), title[keep].float(), scale.float())


def retrieval_recall(image: torch.Tensor, title: torch.Tensor, ks: Sequence[int] = RECALL_AT,
                     pool: int = RETRIEVAL_POOL) -> dict[int, float]:
    """Image-to-title recall@k of N pairs (row i of `image` and `title`, L2-normalised).

    The pairs, in the given order, are cut into ceil(N / pool) consecutive blocks of near-equal size (at most
    `pool` each; one block when N <= pool); image i is ranked against the titles of its block. With a_i
    titles more similar to it than its own and t_i others exactly as similar, ties are broken at random, in
    expectation: image i counts P(rank < k) = clamp((k - a_i) / (t_i + 1), 0, 1). recall@k is the mean over
    images: 1 when every image is closest to its own title, chance (k / block size) when all are equal."""
    n = len(image)
    if n == 0:
        return {k: float("nan") for k in ks}
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for block in torch.tensor_split(torch.arange(n), math.ceil(n / pool)):
        sim = image[block].float() @ title[block].float().T
        own = sim.diagonal()[:, None]
        above, tied = (sim > own).sum(dim=1), (sim == own).sum(dim=1) - 1
        hits += torch.stack([((k - above) / (tied + 1)).clamp(0, 1).sum() for k in ks]).double().cpu()
    return {k: float(h) / n for k, h in zip(ks, hits)}


def pool_loss(image: torch.Tensor, title: torch.Tensor, scale: float, pool: int = RETRIEVAL_POOL) -> float:
    """The contrastive loss over the same blocks as `retrieval_recall`, weighted by block size."""
    n = len(image)
    if n < 2:
        return float("nan")
    loss = ClipLoss()
    scale_t = torch.tensor(scale)
    total = sum(float(loss(image[b].float(), title[b].float(), scale_t)) * len(b)
                for b in torch.tensor_split(torch.arange(n), math.ceil(n / pool)))
    return total / n


@torch.no_grad()
def embed_pairs(model: CMACLIP, batches: Iterable[dict], *, device: str | torch.device = "cpu",
                precision: str = "fp32") -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(product ids, image embeddings, title embeddings) of the batches' pairs that have a title, on CPU, in
    batch order. Eval mode; every module's mode is restored afterwards, as `evaluate.predict` does."""
    restore = _restore_modes(model)
    model.eval()
    ids, images, titles = [], [], []
    try:
        with autocast(device, precision):
            for batch in batches:
                text = trim_tokens(batch["text"])
                keep = has_title(text)
                if not bool(keep.any()):
                    continue
                image, title = embed(model.towers, batch["images"][keep].to(device), text[keep].to(device))
                ids += [str(p) for p, k in zip(batch["product_id"], keep.tolist()) if k]
                images.append(image.float().cpu())
                titles.append(title.float().cpu())
    finally:
        restore()
    dim = model.towers.embed_dim
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dim)  # noqa: E731
    return ids, cat(images), cat(titles)


def retrieval_metrics(ids: Sequence[str], image: torch.Tensor, title: torch.Tensor,
                      scale: float) -> dict[str, float]:
    """Validation metrics of align over the pairs, each product once (a distributed sampler repeats some),
    in product-id order, so one process and any number of ranks cut the same blocks:
    `image_to_title_recall_at_{1,5}`, `loss` (contrastive, at the current temperature), `n` (pairs with a
    title) and `logit_scale` (the inverse temperature, CLIP's exp(logit_scale) clamped at 100)."""
    first: dict[str, int] = {}
    for i, pid in enumerate(ids):
        first.setdefault(pid, i)
    order = [first[pid] for pid in sorted(first)]
    image, title = image[order], title[order]
    recall = retrieval_recall(image, title)
    return {**{f"image_to_title_recall_at_{k}": v for k, v in recall.items()},
            "loss": pool_loss(image, title, scale), "n": len(order), "logit_scale": scale}
