"""Training: one stage (`train_stage`), Algorithm 1's three or the optional catalog pre-training `align`
before them (cmaclip/align.py), or several chained (`train_stages`).

Choices, and why:
- Optimizer: AdamW, i.e. Adam with decoupled weight decay (config.train.weight_decay, the paper's 1e-4), one
  parameter group per trainable module group with the stage's learning rate. Constant learning rate: the
  paper names no schedule, so there is no scheduler state to save.
- Batches: loader factories `epoch -> iterable of batches` (a list or a re-iterable loader also works). The
  factory decides the data order (and, under DDP, the rank's shard), so a resumed epoch k sees the same
  batches as the uninterrupted run. The effective batch config.train.batch_size is reached by
  accumulating gradients over micro-batches: accumulation = batch_size // (micro_batch_size * world).
- Precision (config.train.precision): "auto" = bf16 autocast where the CPU or GPU has bf16, fp16 autocast
  with a grad scaler on GPUs without it, fp32 otherwise. Gradients are clipped to config.train.grad_clip.
- Best checkpoint: by config.train.monitor on the validation set (default: mean recall at 90% precision;
  the paper's "lowest validation accuracy" is a slip). Ties, common on small data where that recall is 0,
  go to the higher mean accuracy, then the lower validation loss. Align's: by image-to-title recall@1, then
  recall@5, then the lower contrastive loss. Early stopping after config.train.patience epochs without a
  better one.
- Resume: after every epoch `last/` holds weights, optimizer, grad scaler, every rank's RNG state, the
  epoch, the best so far and the history; a rerun with the same out_dir continues after the last completed
  epoch and, on CPU with the same seed and batches, ends with bit-identical weights. A finished stage
  returns its stored result at once (without calling callbacks again).
- DDP: under torchrun (torch.distributed initialized) the trainable part is wrapped in
  DistributedDataParallel; every rank validates its own shard and the predictions are gathered with
  all_gather_object (duplicates from sampler padding dropped by product id), so every rank computes the
  same metrics and takes the same early-stopping decision (align gathers its embeddings the same way).
  Only rank 0 writes files and calls callbacks.
  out_dir must be visible to all ranks (one node, or a shared filesystem) for resume.
- Epochs are numbered from 0, like the loader factory's argument; `epochs_run` counts completed ones.

Checkpoint folder of a stage (out_dir):
    best/   cmaclip checkpoint (checkpoint.py): model.safetensors + cmaclip.json with thresholds calibrated
            on validation at config.train.target_precision (none after align) and extra = {stage, epoch,
            metrics, precision, monitor}
    last/   model.safetensors, train_state.pt (optimizer, scaler, RNG; torch.save, read with
            weights_only=True), state.json (epoch, step, best so far, history, config, finished)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tabulate import tabulate
from torch import nn

from .cache import CacheConfig, FeatureCache, cache_config
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .align import MONITOR as ALIGN_MONITOR
from .align import ContrastiveTowers, contrastive_loss, embed_pairs, has_title, retrieval_metrics
from .clip_baseline import logit_scale
from .config import ALIGN, ALL_STAGES, CMACLIPConfig
from .evaluate import Predictions, metrics_from_predictions, predict, thresholds_from_metrics
from .losses import IGNORE, modality_loss, multitask_loss
from .model import CMACLIP
from .precision import autocast, resolve_precision
from .stages import apply_stage, frozen_forward, frozen_groups, frozen_prefix, set_train_mode, trainable_forward
from .transforms import trim_tokens

Batches = Callable[[int], Iterable[dict]] | Iterable[dict]


class Callback:
    """Hooks the training loop calls on rank 0; each does nothing by default. Subclass and override what
    you need (the MLflow logging does). An exception raised in a hook stops the stage; everything up to
    the last `on_epoch_end` is already saved, so a rerun resumes from there."""

    def on_stage_start(self, stage: str, info: dict[str, Any]) -> None:
        """Before the first epoch run in this process. `info`: epochs, start_epoch (> 0 when resumed),
        frozen, lr (per group), trainable_parameters, precision, accumulation, world_size, cache, config."""

    def on_step(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step (1-based, counted over the stage): loss, loss/<task> (means over the
        step's micro-batches and ranks), grad_norm (before clipping), lr/<group>."""

    def on_epoch_end(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        """After epoch `epoch` (0-based) is validated and saved: the history entry (train/*, val/*, lr/*,
        cache/*, improved)."""

    def on_stage_end(self, stage: str, result: "StageResult") -> None:
        """After the last epoch (or early stop)."""


@dataclass
class StageResult:
    stage: str
    best_checkpoint: Path
    best_metrics: dict[str, float]       # validation metrics of the best epoch (evaluate's keys)
    history: list[dict[str, Any]]        # one entry per epoch: train/*, val/*, lr/*, cache/*, improved
    epochs_run: int
    best_epoch: int
    stopped_early: bool = False


@dataclass
class _State:
    epoch: int = 0                   # completed epochs
    step: int = 0                    # optimizer steps
    best_epoch: int = -1
    best_key: list[float] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Small helpers: distributed, RNG, files.

def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _dist()[1] > 1:
        dist.barrier()


def _gather(obj) -> list:
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if _dist()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _commit_dir(tmp: Path, final: Path) -> None:
    """Replace a folder by a fully written one; a crash in between leaves `<final>.old` (see
    `_committed_dir`)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _committed_dir(final: Path) -> Path:
    """The folder `_commit_dir` last committed: `<final>.old` if a crash left only that. Read-only, so
    every rank may call it."""
    old = final.with_name(final.name + ".old")
    return old if not final.exists() and old.exists() else final


def _as_factory(batches: Batches) -> Callable[[int], Iterable[dict]]:
    return batches if callable(batches) else (lambda epoch: batches)


def _with_last(iterable: Iterable):
    """(item, is_last) pairs: the last micro-batch of an epoch must end the accumulation window."""
    it = iter(iterable)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield prev, False
        prev = item
    yield prev, True


def _rank_key(metrics: dict[str, float], monitor: str, then: str = "mean_accuracy") -> list[float]:
    """Larger is better: the monitored metric, then `then`, then lower validation loss."""
    if monitor not in metrics:
        raise KeyError(f"monitor {monitor!r} is not a validation metric; have {sorted(metrics)}")
    sign = -1.0 if monitor.endswith("loss") else 1.0
    key = [sign * metrics[monitor], metrics.get(then, -math.inf), -metrics.get("loss", math.inf)]
    return [-math.inf if math.isnan(v) else float(v) for v in key]


def _json_config(config: CMACLIPConfig) -> dict:
    return json.loads(config.to_json())


# ---------------------------------------------------------------------------------------------------------
# The stage.

class _Trainable(nn.Module):
    """The part of the forward pass a stage trains, as one module: this is what DDP wraps, so its forward
    is where gradient synchronisation hooks in."""

    def __init__(self, model: CMACLIP, prefix: str, per_modality: bool = False):
        super().__init__()
        self.model, self.prefix, self.per_modality = model, prefix, per_modality

    def forward(self, **inputs):
        """Logits per task; with `per_modality`, (logits, each modality's logits alone)."""
        out = trainable_forward(self.model, self.prefix, per_modality=self.per_modality, **inputs)
        return (out.logits, out.modality_logits) if self.per_modality else out.logits


class _StageRun:
    """Everything one stage holds: model, optimizer, scaler, cache, state; one method per step of the loop."""

    def __init__(self, model: CMACLIP, stage: str, config: CMACLIPConfig, out_dir: Path, *,
                 cache: CacheConfig | None, device: torch.device, labels: dict[str, list[str]] | None):
        if config.tasks and config.tasks != model.config.tasks:
            raise ValueError(f"config tasks {config.tasks} differ from the model's {model.config.tasks}")
        self.stage, self.out_dir, self.device = stage, out_dir, device
        self.rank, self.world = _dist()
        self.train_cfg = config.train
        # Architecture and tasks come from the model; training settings from `config`.
        self.config = dataclasses.replace(model.config, train=config.train)
        self.model = model.to(device)
        self.labels = labels or {t: [str(i) for i in range(n)] for t, n in model.config.tasks.items()}
        self.precision = resolve_precision(config.train.precision, device)
        self.frozen = frozen_groups(stage, config)
        param_groups = apply_stage(model, stage, config)
        self.group_lrs = {g["name"]: g["lr"] for g in param_groups}
        self.params = [p for g in param_groups for p in g["params"]]
        # The fused kernel updates all tensors in one call instead of a Python loop over them.
        fused = device.type in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(param_groups, weight_decay=config.train.weight_decay, fused=fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        micro = config.train.micro_batch_size * self.world
        self.accumulation = max(1, config.train.batch_size // micro)
        self.prefix = frozen_prefix(model, self.frozen)
        # Augmented images differ every epoch, so nothing frozen would recur (corrupted titles are keyed).
        self.cache = (FeatureCache(cache, out_dir / f"cache-rank{self.rank}") if cache is not None
                      and self.prefix != "none" and not config.train.stages[stage].augments_images else None)
        self.net: nn.Module = self.trainable()
        self.state = _State()

    # -- what the stage optimises: Algorithm 1's classification (_AlignRun overrides these) --------------
    @property
    def monitor(self) -> str:
        return self.train_cfg.monitor

    @property
    def modality_weight(self) -> float:
        """Weight of the per-modality loss; 0 when the model has one modality (it would repeat the loss)."""
        both = self.model.use_image and self.model.use_text
        return self.train_cfg.stages[self.stage].modality_loss if both else 0.0

    def trainable(self) -> nn.Module:
        return _Trainable(self.model, self.prefix, per_modality=self.modality_weight > 0)

    def loss_parts(self) -> list[str]:
        """Names of the loss's parts, logged as loss/<part>."""
        return [*self.model.tasks, *(["modality"] if self.modality_weight > 0 else [])]

    def loss(self, inputs: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """(loss, its parts, samples it covers) of one micro-batch; runs under autocast."""
        targets, out = self.targets(batch), self.net(**inputs)
        if self.modality_weight == 0:
            loss, per_task = multitask_loss(out, targets)
            return loss, [per_task[t] for t in self.model.tasks], len(batch["product_id"])
        (loss, per_task), alone = multitask_loss(out[0], targets), modality_loss(out[1], targets)
        parts = [per_task[t] for t in self.model.tasks] + [alone]
        return loss + self.modality_weight * alone, parts, len(batch["product_id"])

    def rank_key(self, metrics: dict[str, float]) -> list[float]:
        return _rank_key(metrics, self.monitor)

    # -- set-up -------------------------------------------------------------------------------------------
    def wrap_ddp(self) -> None:
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            gpu = None
            if self.device.type == "cuda":
                gpu = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
            self.net = DDP(self.net, device_ids=gpu, find_unused_parameters=self.unused_parameters())

    def unused_parameters(self) -> bool:
        """A single-modality variant never uses the other tower: DDP must be told to expect that."""
        return not (self.model.use_image and self.model.use_text)

    def finished(self) -> bool:
        patience = self.train_cfg.patience
        return (self.state.epoch >= self.train_cfg.stages[self.stage].epochs
                or (patience > 0 and self.state.since_best >= patience))

    def info(self) -> dict[str, Any]:
        return {"stage": self.stage, "epochs": self.train_cfg.stages[self.stage].epochs,
                "start_epoch": self.state.epoch, "frozen": sorted(self.frozen), "lr": self.group_lrs,
                "trainable_parameters": sum(p.numel() for p in self.params), "precision": self.precision,
                "accumulation": self.accumulation, "world_size": self.world, "out_dir": str(self.out_dir),
                "cache": None if self.cache is None else dataclasses.asdict(self.cache.config),
                "config": _json_config(self.config)}

    # -- one epoch of training ----------------------------------------------------------------------------
    def compute_frozen(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        # no_grad, not inference_mode: these tensors feed the autograd graph of the trainable part.
        with torch.no_grad(), autocast(self.device, self.precision):
            return frozen_forward(self.model, self.prefix, images.to(self.device),
                                  trim_tokens(text).to(self.device))

    def inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        images, text = batch["images"], trim_tokens(batch["text"])
        if self.prefix == "none":
            return {"images": images.to(self.device), "text": text.to(self.device)}
        if self.cache is None:
            return self.compute_frozen(images, text)
        features = self.cache(batch["product_id"], images, text, self.compute_frozen)
        return {k: v.to(self.device) for k, v in features.items()}

    def targets(self, batch: dict) -> dict[str, torch.Tensor]:
        labels, n = batch.get("labels", {}), len(batch["product_id"])
        return {t: labels[t].to(self.device) if t in labels else torch.full((n,), IGNORE, device=self.device)
                for t in self.model.tasks}

    def optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        clip = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return float(norm)

    def train_epoch(self, batches: Iterable[dict], callbacks: Sequence[Callback], progress: bool) -> dict:
        set_train_mode(self.model, self.frozen)
        window = torch.zeros(2 + len(self.loss_parts()), device=self.device)  # loss, micro-batches, parts
        total = torch.zeros(2, device=self.device)                   # loss * samples, samples
        if progress and self.rank == 0:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc=f"{self.stage} epoch {self.state.epoch}", leave=False)
        start = time.perf_counter()
        for i, (batch, last) in enumerate(_with_last(batches)):
            boundary = last or (i + 1) % self.accumulation == 0
            inputs = self.inputs(batch)
            no_sync = self.net.no_sync() if (self.world > 1 and not boundary) else nullcontext()
            with no_sync:
                with autocast(self.device, self.precision):
                    loss, parts, n = self.loss(inputs, batch)
                self.scaler.scale(loss / self.accumulation).backward()
            window += torch.stack([loss.detach(), torch.tensor(1.0, device=self.device),
                                   *[part.detach() for part in parts]])
            total += torch.stack([loss.detach() * n, torch.tensor(float(n), device=self.device)])
            if boundary:
                self.log_step(self.optimizer_step(), window, callbacks)
                window.zero_()
            if progress and self.rank == 0:
                batches.set_postfix(loss=f"{loss.item():.4f}")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        loss_sum, samples = _sum_across_ranks(total).tolist()
        return {"train/loss": loss_sum / max(samples, 1), "train/samples": int(samples),
                "train/seconds": seconds, "train/samples_per_s": samples / seconds if seconds > 0 else 0.0}

    def log_step(self, grad_norm: float, window: torch.Tensor, callbacks: Sequence[Callback]) -> None:
        window = _sum_across_ranks(window).tolist()
        count = max(window[1], 1.0)
        metrics = {"loss": window[0] / count, "grad_norm": grad_norm,
                   **{f"loss/{t}": v / count for t, v in zip(self.loss_parts(), window[2:])},
                   **{f"lr/{g}": lr for g, lr in self.group_lrs.items()}}
        if self.rank == 0:
            for cb in callbacks:
                cb.on_step(self.stage, self.state.step, metrics)

    # -- validation and checkpoints -----------------------------------------------------------------------
    def validate(self, batches: Iterable[dict]) -> dict[str, float]:
        preds = predict(self.model, batches, device=self.device, precision=self.precision)
        if self.world > 1:
            preds = Predictions.concat(_gather(preds)).unique()
        return metrics_from_predictions(preds, self.train_cfg.target_precision)

    def update_best(self, epoch: int, metrics: dict[str, float]) -> bool:
        key = self.rank_key(metrics)
        improved = self.state.best_key is None or key > self.state.best_key
        if improved:
            self.state.best_key, self.state.best_epoch, self.state.best_metrics = key, epoch, metrics
            self.state.since_best = 0
        else:
            self.state.since_best += 1
        return improved

    def save_best(self, epoch: int, metrics: dict[str, float]) -> None:
        extra = {"stage": self.stage, "epoch": epoch, "metrics": metrics, "precision": self.precision,
                 "target_precision": self.train_cfg.target_precision, "monitor": self.monitor}
        ckpt = Checkpoint(self.config, self.labels, thresholds_from_metrics(metrics, self.model.tasks), extra)
        tmp = self.out_dir / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, self.model, ckpt)
        _commit_dir(tmp, self.out_dir / "best")

    def save_last(self) -> None:
        rng = _gather(_rng_state(self.device))  # every rank's, so a resumed DDP run is exact too
        if self.rank == 0:
            tmp = self.out_dir / "last.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(self.model, str(tmp / "model.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                        "rng": rng}, tmp / "train_state.pt")
            meta = {"stage": self.stage, "state": dataclasses.asdict(self.state), "finished": self.finished(),
                    "world_size": self.world, "config": _json_config(self.config)}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))
            _commit_dir(tmp, self.out_dir / "last")
        _barrier()

    def load_last(self) -> bool:
        """Restore the state after the last completed epoch; False when there is none."""
        last = _committed_dir(self.out_dir / "last")
        if not (last / "state.json").exists():
            return False
        meta = json.loads((last / "state.json").read_text())
        stored = _json_config(CMACLIPConfig.from_dict(meta["config"]))  # fields added since get their defaults
        if meta["stage"] != self.stage or stored != _json_config(self.config):
            raise ValueError(f"{last} holds a {meta['stage']} run with another config; use another out_dir "
                             "or resume=False to start over")
        load_model(self.model, str(last / "model.safetensors"), device=str(self.device))
        saved = torch.load(last / "train_state.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        if len(saved["rng"]) == self.world:
            _set_rng_state(saved["rng"][self.rank], self.device)
        else:  # another world size: data order and RNG streams differ anyway; keep going, reseeded
            _seed(self.train_cfg.seed + 1000 * meta["state"]["epoch"] + self.rank)
        self.state = _State(**meta["state"])
        return True

    def result(self) -> StageResult:
        s = self.state
        return StageResult(self.stage, self.out_dir / "best", s.best_metrics, s.history, s.epoch, s.best_epoch,
                           stopped_early=s.epoch < self.train_cfg.stages[self.stage].epochs)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


class _AlignRun(_StageRun):
    """The align stage: CLIP's contrastive loss on (image, title) pairs; image-to-title retrieval recall on
    validation (cmaclip/align.py). Checkpoints, resume, DDP and callbacks are the other stages'."""

    def __init__(self, model: CMACLIP, stage: str, config: CMACLIPConfig, out_dir: Path, **kwargs):
        inputs = config.train.stages[stage]
        if inputs.drop_title or inputs.swap_title:
            raise ValueError("align learns from each image and its own title: drop_title and swap_title would "
                             "unpair them; set both to 0 in the align stage")
        super().__init__(model, stage, config, out_dir, **kwargs)

    @property
    def monitor(self) -> str:
        return ALIGN_MONITOR

    def trainable(self) -> nn.Module:
        return ContrastiveTowers(self.model)

    def unused_parameters(self) -> bool:
        return False  # both towers and the temperature enter every loss

    def loss_parts(self) -> list[str]:
        return []

    def loss(self, inputs: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        keep = has_title(inputs["text"])
        return contrastive_loss(*self.net(**inputs), keep), [], int(keep.sum())

    def validate(self, batches: Iterable[dict]) -> dict[str, float]:
        ids, image, title = embed_pairs(self.model, batches, device=self.device, precision=self.precision)
        if self.world > 1:
            parts = _gather((ids, image, title))
            ids = [i for p in parts for i in p[0]]
            image, title = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
        return retrieval_metrics(ids, image, title, float(logit_scale(self.model.towers).detach()))

    def rank_key(self, metrics: dict[str, float]) -> list[float]:
        return _rank_key(metrics, self.monitor, then="image_to_title_recall_at_5")


def read_stage_result(out_dir: str | os.PathLike) -> StageResult | None:
    """The stored result of a finished stage in out_dir, or None if it has not finished."""
    out_dir = Path(out_dir)
    path = _committed_dir(out_dir / "last") / "state.json"
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if not meta.get("finished"):
        return None
    s = _State(**meta["state"])
    epochs = meta["config"]["train"]["stages"][meta["stage"]]["epochs"]
    return StageResult(meta["stage"], out_dir / "best", s.best_metrics, s.history, s.epoch, s.best_epoch,
                       stopped_early=s.epoch < epochs)


def train_stage(model: CMACLIP, stage: str, config: CMACLIPConfig, train_batches: Batches,
                val_batches: Batches, out_dir: str | os.PathLike, *, callbacks: Sequence[Callback] = (),
                cache: None | str | CacheConfig = None, device: str | torch.device = "cpu",
                labels: dict[str, list[str]] | None = None, resume: bool = True,
                progress: bool = False) -> StageResult:
    """Train one stage (Algorithm 1's, or align) and return its best checkpoint (out_dir/best) and history.

    `model` gives the architecture, tasks and starting weights, and ends with the last epoch's weights
    (the best ones are in best/); `config.train` gives the training settings. `train_batches` and
    `val_batches`: loader factories `epoch -> batches`, or re-iterable collections of batches.
    `cache`: None, "memory", "disk" or a CacheConfig (frozen-feature cache; warm-up and tuning only, and
    not in a stage that augments images). Title corruption and image augmentation are the batches' business
    (pipeline.training.data applies the stage's); `config` only tells the trainer whether images change.
    `labels`: class names per task for the checkpoint (default "0", "1", ...). `progress`: a tqdm bar
    per epoch on rank 0."""
    if stage not in ALL_STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {ALL_STAGES}")
    if config.train.stages[stage].epochs < 1:
        raise ValueError(f"stage {stage} has {config.train.stages[stage].epochs} epochs; leave it out instead")
    out_dir, device = Path(out_dir), torch.device(device)
    run_class = _AlignRun if stage == ALIGN else _StageRun
    run = run_class(model, stage, config, out_dir, cache=cache_config(cache), device=device, labels=labels)
    if not (resume and run.load_last()):
        if run.rank == 0:
            for name in ("last", "last.old", "best", "best.old"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
            out_dir.mkdir(parents=True, exist_ok=True)
        _barrier()
        _seed(config.train.seed + run.rank)
    if run.finished():
        run.close()
        return run.result()
    run.wrap_ddp()
    train_for, val_for = _as_factory(train_batches), _as_factory(val_batches)
    if run.rank == 0:
        for cb in callbacks:
            cb.on_stage_start(stage, run.info())
    try:
        while not run.finished():
            epoch = run.state.epoch
            entry = {"epoch": epoch, **run.train_epoch(train_for(epoch), callbacks, progress)}
            metrics = run.validate(val_for(epoch))
            improved = run.update_best(epoch, metrics)
            if improved and run.rank == 0:
                run.save_best(epoch, metrics)
            entry.update({f"val/{k}": v for k, v in metrics.items()})
            entry.update({f"lr/{g}": lr for g, lr in run.group_lrs.items()})
            if run.cache is not None:
                entry.update({f"cache/{k}": v for k, v in run.cache.stats().items()})
            entry["improved"] = improved
            run.state.history.append(entry)
            run.state.epoch += 1
            run.save_last()
            if run.rank == 0:
                for cb in callbacks:
                    cb.on_epoch_end(stage, epoch, entry)
    finally:
        run.close()
    result = run.result()
    if run.rank == 0:
        for cb in callbacks:
            cb.on_stage_end(stage, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# All stages.

def _starting_model(source, device) -> tuple[CMACLIP, dict[str, list[str]] | None]:
    """A model, a zero-argument factory, or a checkpoint folder -> (model, labels if known)."""
    if isinstance(source, CMACLIP):
        return source, None
    if isinstance(source, (str, os.PathLike)):
        model, ckpt = load_checkpoint(source, device=device)
        return model, ckpt.labels
    return source(), None


def train_stages(config: CMACLIPConfig, init: CMACLIP | Callable[[], CMACLIP] | str | os.PathLike,
                 train_batches: Batches | Mapping[str, Batches], val_batches: Batches,
                 out_dir: str | os.PathLike, *,
                 stages: Sequence[str] | None = None, callbacks: Sequence[Callback] = (),
                 cache: None | str | CacheConfig = None, device: str | torch.device = "cpu",
                 labels: dict[str, list[str]] | None = None, resume: bool = True,
                 progress: bool = False) -> dict[str, StageResult]:
    """Run stages in order (out_dir/<stage>/), each starting from the previous stage's best checkpoint.

    `init` starts the first stage: a model, a factory returning one, or a checkpoint folder. `stages`: by
    default the config's (`TrainConfig.stage_order`: align when it has epochs, then Algorithm 1's three).
    With resume=True a finished stage is not run again and an interrupted one continues. `train_batches` may
    be {stage: batches}, for stages whose inputs differ (title corruption, image augmentation)."""
    stages = config.train.stage_order() if stages is None else stages
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; stages are {ALL_STAGES}")
    results: dict[str, StageResult] = {}
    source = init
    for stage in stages:
        stage_dir = Path(out_dir) / stage
        done = read_stage_result(stage_dir) if resume else None
        if done is None:
            model, known = _starting_model(source, device)
            labels = labels or known
            batches = train_batches[stage] if isinstance(train_batches, Mapping) else train_batches
            done = train_stage(model, stage, config, batches, val_batches, stage_dir,
                               callbacks=callbacks, cache=cache, device=device, labels=labels,
                               resume=resume, progress=progress)
        results[stage] = done
        source = done.best_checkpoint
    return results


# ---------------------------------------------------------------------------------------------------------
# For the CLI.

SUMMARY_KEYS = ("mean_recall_at_precision", "mean_accuracy", "mean_macro_f1", ALIGN_MONITOR, "loss")


class PrintCallback(Callback):
    """One line per epoch (the CLI prints it, the Airflow training tasks log it): training loss, the
    validation metrics, throughput and time."""

    def __init__(self, print_fn: Callable[[str], None] = print, keys: Sequence[str] = SUMMARY_KEYS):
        self.print, self.keys = print_fn, keys

    def on_epoch_end(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        vals = " ".join(f"{k}={metrics[f'val/{k}']:.4f}" for k in self.keys if f"val/{k}" in metrics)
        self.print(f"{stage} epoch {epoch}: train/loss={metrics['train/loss']:.4f} {vals} "
                   f"({metrics['train/samples_per_s']:.1f} samples/s, {metrics['train/seconds']:.1f} s)"
                   f"{' *' if metrics['improved'] else ''}")


def stage_table(results: dict[str, StageResult], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """A per-stage table of the best validation metrics (the columns some stage has)."""
    keys = [k for k in keys if any(k in r.best_metrics for r in results.values())]
    rows = [[s, r.epochs_run, r.best_epoch, *(r.best_metrics.get(k, float("nan")) for k in keys)]
            for s, r in results.items()]
    return tabulate(rows, ["stage", "epochs", "best_epoch", *keys], floatfmt=".4f")
