"""The CLIP baselines of paper Table 2: contrastive fine-tuning on image-title pairs, and zero-shot
classification with prompts.

Both work on `CLIPTowers`, the same towers CMA-CLIP is built on, so a baseline and CMA-CLIP built from one
config and seed start from identical CLIP weights. Zero-shot classifies from the image alone: the text
tower only embeds the class prompts, as in CLIP.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from .encoders import CLIPTowers
from .evaluate import Predictions
from .precision import autocast, resolve_precision
from .transforms import eot_index, trim_tokens

# CLIP-style prompts; the bare label is kept beside them because fine-tuning only ever shows the text
# tower product titles, which name attributes without "a photo of" around them (prompt ensembling,
# Radford et al. 2021, section 3.1.4).
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("a photo of a {} product.", "{}"),
    "article_type": ("a photo of a {}.", "{}"),
    "usage": ("a photo of a {} product.", "{} wear"),
}
GENERIC_TEMPLATES = ("a photo of a {} product.", "{}")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned temperature here


def templates_for(task: str) -> tuple[str, ...]:
    return DEFAULT_TEMPLATES.get(task, GENERIC_TEMPLATES)


def embed(towers: CLIPTowers, images: torch.Tensor | None = None, text: torch.Tensor | None = None):
    """L2-normalised pooled embeddings: image CLS and text end-of-text, as CLIP's encode_* give them."""
    image = F.normalize(towers.encode_image_tokens(images)[:, 0], dim=-1) if images is not None else None
    if text is None:
        return image, None
    tokens, _ = towers.encode_text_tokens(text)
    pooled = tokens[torch.arange(text.shape[0], device=text.device), eot_index(text)]
    return image, F.normalize(pooled, dim=-1)


def logit_scale(towers: CLIPTowers) -> torch.Tensor:
    return towers.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def finetune_contrastive(towers: CLIPTowers, epochs_of_batches: Callable[[int], Iterable[dict]], *,
                         epochs: int, lr: float, weight_decay: float = 1e-4, grad_clip: float = 1.0,
                         precision: str = "fp32", device: str = "cpu",
                         log: Callable[[str], None] = print) -> list[float]:
    """Symmetric InfoNCE (CLIP's loss) over image-title pairs for `epochs` epochs; returns the mean loss
    of each epoch. `epochs_of_batches(epoch)` yields that epoch's training batches (shuffled by epoch).
    Every tower weight and the temperature train: here the temperature does get a gradient."""
    precision = resolve_precision(precision, device)
    towers.to(device).train()
    params = [p for p in towers.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss_fn, history = ClipLoss(), []
    for epoch in range(epochs):
        total, n = 0.0, 0
        for batch in epochs_of_batches(epoch):
            if len(batch["product_id"]) < 2:
                continue  # one pair has no negatives
            with autocast(device, precision):
                image, text = embed(towers, batch["images"].to(device), trim_tokens(batch["text"]).to(device))
                loss = loss_fn(image.float(), text.float(), logit_scale(towers).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            total, n = total + loss.item() * len(batch["product_id"]), n + len(batch["product_id"])
        history.append(total / max(n, 1))
        log(f"contrastive epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    return history


@torch.no_grad()
def title_retrieval(towers: CLIPTowers, batches: Iterable[dict], device: str = "cpu") -> dict[str, float]:
    """Image -> title top-1 retrieval over every (image, title) pair of the batches: the share of images
    whose own title is the most similar of all titles. Checks that contrastive training aligned the towers
    whatever zero-shot prompting then makes of it."""
    towers.to(device).eval()
    images, titles = [], []
    for batch in batches:
        image, text = embed(towers, batch["images"].to(device), trim_tokens(batch["text"]).to(device))
        images.append(image.float())
        titles.append(text.float())
    images, titles = torch.cat(images), torch.cat(titles)
    hits = (images @ titles.T).argmax(dim=1) == torch.arange(len(images), device=images.device)
    return {"top1": float(hits.float().mean()), "n": len(images), "chance": 1.0 / max(len(images), 1)}


@torch.no_grad()
def class_embeddings(towers: CLIPTowers, tokenize: Callable[[Sequence[str]], torch.Tensor],
                     class_names: Sequence[str], templates: Sequence[str], device: str = "cpu") -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings (prompt ensembling)."""
    per_template = []
    for template in templates:
        text = trim_tokens(tokenize([template.format(name) for name in class_names])).to(device)
        per_template.append(embed(towers, text=text)[1].float())
    return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)


def zero_shot_predict(towers: CLIPTowers, batches: Iterable[dict], classes: Mapping[str, Sequence[str]],
                      tokenize: Callable[[Sequence[str]], torch.Tensor], *,
                      templates: Mapping[str, Sequence[str]] | None = None, precision: str = "fp32",
                      device: str = "cpu") -> Predictions:
    """Per task, softmax over classes of the scaled cosine similarity between the image and each class's
    prompts. `classes[task]` lists class names by label id, so the probabilities line up with the labels."""
    precision = resolve_precision(precision, device)
    towers.to(device).eval()
    with torch.inference_mode(), autocast(device, precision):
        prompts = {t: class_embeddings(towers, tokenize, names, (templates or {}).get(t) or templates_for(t),
                                       device) for t, names in classes.items()}
        scale = float(logit_scale(towers))
        ids, probs, labels = [], {t: [] for t in classes}, {t: [] for t in classes}
        for batch in batches:
            image, _ = embed(towers, batch["images"].to(device))
            ids.extend(str(i) for i in batch["product_id"])
            for task, text in prompts.items():
                probs[task].append(torch.softmax(scale * image.float() @ text.T, dim=-1).cpu().numpy())
                labels[task].append(np.asarray(batch["labels"][task].cpu(), dtype=np.int64))
    cat = lambda d: {t: np.concatenate(v) for t, v in d.items() if v}  # noqa: E731
    return Predictions(ids, cat(probs), cat(labels), {})
