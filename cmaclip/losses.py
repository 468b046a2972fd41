"""Algorithm 1, lines 13-15: softmax cross-entropy per task, summed over tasks; and the auxiliary
per-modality loss (not in the paper): the same loss on each modality's global embedding classified alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1  # label id of a sample whose label for a task is missing


def multitask_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]):
    """Returns (sum over tasks, {task: loss}). A missing label (-1) masks that task's loss only; a task
    with no labelled sample in the batch contributes zero rather than NaN."""
    per_task = {}
    for task, task_logits in logits.items():
        target = labels[task]
        n = (target != IGNORE).sum()
        loss = F.cross_entropy(task_logits.float(), target, ignore_index=IGNORE, reduction="sum")
        per_task[task] = loss / n.clamp(min=1)
    return sum(per_task.values()), per_task


def modality_loss(alone: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The multitask loss of I' alone and of T' alone (`CMACLIP.classify(per_modality=True)`), averaged over
    the two. It keeps each modality able to name the label by itself, so that when the title is silent
    the image still can, and the modality attention has a real choice to make."""
    modalities = sorted({m for per_task in alone.values() for m in per_task})
    losses = [multitask_loss({t: alone[t][m] for t in alone}, labels)[0] for m in modalities]
    return sum(losses) / len(losses)
