"""Figure 2 of the paper: for a few test products, the image as the model saw it and the same image under
the sequence attention of one title word (the product's color) over the image patches. Small PNGs (a few
tens of KB) so they can live in the repository.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402

from cmaclip.attention_maps import default_layer, phrase_token_positions, upsample, word_patch_attention  # noqa: E402
from cmaclip.config import CMACLIPConfig  # noqa: E402
from cmaclip.corruption import names_label  # noqa: E402
from pipeline.training.data import collate  # noqa: E402

from .splits import SplitData  # noqa: E402

DISPLAY = 160  # pixels per panel: enough to see the map, small enough for a repository


def model_view(pixels: torch.Tensor) -> np.ndarray:
    """The normalised model input [3, S, S] back to an RGB array [DISPLAY, DISPLAY, 3] in [0, 1]."""
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    rgb = (pixels.float().cpu() * std + mean).clamp(0, 1)
    rgb = F.interpolate(rgb[None], size=(DISPLAY, DISPLAY), mode="bicubic", align_corners=False)[0]
    return rgb.clamp(0, 1).permute(1, 2, 0).numpy()


def marked_title(title: str, phrase: str) -> str:
    """The title with the attended words in brackets, like the paper's tables mark label words."""
    words = {w.lower() for w in phrase.split()}
    return " ".join(f"[{w}]" if w.strip(".,;:!?()").lower() in words else w for w in title.split())


def draw(pixels: torch.Tensor, heat: np.ndarray, title: str, phrase: str, layer: int):
    """Two panels: the model's view of the image, and the attention of `phrase` over its patches."""
    fig, axes = plt.subplots(1, 2, figsize=(4.2, 2.55), dpi=80)
    image = model_view(pixels)
    axes[0].imshow(image)
    axes[1].imshow(image)
    axes[1].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, extent=(0, DISPLAY, DISPLAY, 0))
    for ax, label in zip(axes, ("model input", f"'{phrase}' -> patches, layer {layer}")):
        ax.set_axis_off()
        ax.set_title(label, fontsize=7)
    shown = marked_title(title, phrase)
    fig.suptitle(shown if len(shown) <= 60 else shown[:57] + "...", fontsize=7)
    fig.tight_layout()
    return fig


def save_png(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, format="png", pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def pick_examples(test: SplitData, bpe, task: str, k: int) -> list[tuple[int, str, list[int]]]:
    """Up to k test products whose title names their `task` label, one per label, in test (hash) order:
    (index, label phrase, token positions of its words)."""
    chosen, seen = [], set()
    for i, (title, label) in enumerate(zip(test.titles, test.labels[task])):
        if len(chosen) == k:
            break
        if not title or label is None or label in seen or not names_label([title], [label])[0]:
            continue
        positions = phrase_token_positions(bpe, title, label)
        if positions and max(positions) < bpe.context_length - 1:  # not cut off by the context
            chosen.append((i, label, positions))
            seen.add(label)
    return chosen


def attention_examples(checkpoint: Path, test: SplitData, config: CMACLIPConfig, out_dir: Path,
                       k: int) -> list[dict[str, Any]]:
    """PNGs of the sequence attention from a title's color word to the image patches; their records."""
    import open_clip

    from cmaclip.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    task = "color" if "color" in config.tasks else list(config.tasks)[0]
    bpe = open_clip.get_tokenizer(config.clip.model_name, context_length=config.clip.context_length)
    chosen = pick_examples(test, bpe, task, k)
    if not chosen:
        return []
    batch = collate([test.samples[i] for i, _, _ in chosen])
    layer = default_layer(model)
    maps = word_patch_attention(model, batch["images"], batch["text"], [p for _, _, p in chosen], layer)
    out = []
    for (i, phrase, _), pixels, heat in zip(chosen, batch["images"], upsample(maps, DISPLAY)):
        pid = test.product_id[i]
        path = save_png(draw(pixels, heat.numpy(), test.titles[i], phrase, layer), out_dir / f"{pid}.png")
        out.append({"product_id": pid, "title": test.titles[i], "word": phrase, "task": task, "layer": layer,
                    "png": f"attention/{path.name}", "bytes": path.stat().st_size})
    return out
