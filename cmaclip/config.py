"""Configuration dataclasses for CMA-CLIP and the loader for `cmaclip/configs/*.json`.

A config is plain data: `CMACLIPConfig` maps one-to-one onto the JSON files in `cmaclip/configs/`, so a run's
config can be logged, diffed and rebuilt without importing anything but this module.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: ships in the wheel
STAGES = ("warmup", "end_to_end", "tuning")   # Algorithm 1's, in order: what a training runs by default
ALIGN = "align"                               # optional catalog pre-training of the CLIP towers, before warm-up
ALL_STAGES = (ALIGN, *STAGES)
MODALITIES = ("title", "image")               # the inputs cmaclip.explain withholds, one at a time
# The precisions a run may ask for, defined here (torch-free) for every flag and check; cmaclip.precision
# says what each means and what "auto" picks. Training autocasts; inference also takes int8 weights.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")


@dataclass
class CLIPConfig:
    """The open_clip model whose towers emit the token sequences."""
    model_name: str = "ViT-B-32"
    pretrained: str | None = None        # open_clip tag or local weights path; None = random init
    overrides: dict[str, Any] = field(default_factory=dict)  # open_clip create_model kwargs (tiny configs)
    force_quick_gelu: bool = False       # OpenAI weights were trained with QuickGELU
    context_length: int = 77             # tokenizer context; batches are trimmed below it


@dataclass
class CMAConfig:
    """Cross-modality attention: SequenceAttention, per-task ModalityAttention and MLP heads."""
    layers: int = 12
    width: int = 512
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    head_hidden: int = 512
    # Ablations (paper Table 6 and single-modality baselines).
    sequence_attention: bool = True      # False: pooled CLIP embeddings go straight to modality attention
    modality_attention: bool = True      # False: lambda fixed at 0.5
    modalities: str = "image+text"       # "image+text" | "image" | "text"


TITLE_POLICIES = ("drop_title", "remove_label_words", "swap_title")


@dataclass
class StageConfig:
    """One training stage (Algorithm 1's, or align): epochs and learning rate per parameter group (0 = frozen;
    align's lr_clip also trains CLIP's temperature), and what the stage does to its training inputs
    (cmaclip/corruption.py, transforms.augment_image). The defaults change nothing: the stage trains on the
    products as they are, exactly as without these fields."""
    epochs: int = 20
    lr_clip: float = 0.0
    lr_sequence: float = 1e-5
    lr_modality: float = 1e-5
    lr_head: float = 1e-5
    # Title corruption, per training sample at most one policy, each with its own probability (sum <= 1):
    drop_title: float = 0.0              # the title becomes ""
    remove_label_words: float = 0.0      # the words of the sample's own labels are deleted from its title
    label_word_tasks: list[str] = field(default_factory=list)  # whose labels; empty = every task
    swap_title: float = 0.0              # the title of another product of the split (or row group)
    # Image augmentation that keeps the attribute:
    crop_scale: tuple[float, float] | None = None  # square crop of this area range of the eval crop; None = eval's
    flip: float = 0.0                    # probability of a horizontal flip
    color_jitter: float = 0.0            # brightness, contrast, saturation factors in [1-x, 1+x]; never for colour
    # Auxiliary loss (cmaclip/losses.py): weight of each task's head classifying I' alone and T' alone
    modality_loss: float = 0.0

    def __post_init__(self):
        probabilities = {k: getattr(self, k) for k in (*TITLE_POLICIES, "flip")}
        bad = {k: p for k, p in probabilities.items() if not 0.0 <= p <= 1.0}
        if bad:
            raise ValueError(f"probabilities must be in [0, 1]: {bad}")
        if sum(getattr(self, k) for k in TITLE_POLICIES) > 1.0 + 1e-9:
            raise ValueError(f"the title policies {TITLE_POLICIES} apply at most one per sample: their "
                             "probabilities must sum to at most 1")
        if self.crop_scale is not None:
            self.crop_scale = tuple(float(x) for x in self.crop_scale)  # a list when read from JSON
            if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
                raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, not {self.crop_scale}")
        if self.modality_loss < 0:
            raise ValueError(f"modality_loss is a loss weight: at least 0, not {self.modality_loss}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), not {self.color_jitter}")
        self.label_word_tasks = list(self.label_word_tasks)

    @property
    def corrupts_titles(self) -> bool:
        return any(getattr(self, k) > 0 for k in TITLE_POLICIES)

    @property
    def augments_images(self) -> bool:
        return self.crop_scale is not None or self.flip > 0 or self.color_jitter > 0

    def choices_on(self) -> dict[str, dict[str, Any]]:
        """The training choices this stage turns on: {group: {field: value}} of the fields that differ from
        StageConfig's defaults."""
        default = StageConfig()
        out = {group: {f: getattr(self, f) for f in fields if getattr(self, f) != getattr(default, f)}
               for group, fields in TRAINING_CHOICES.items()}
        return {group: on for group, on in out.items() if on}

    def without(self, group: str) -> "StageConfig":
        """This stage with one group of training choices back at StageConfig's defaults."""
        default = StageConfig()
        return dataclasses.replace(self, **{f: getattr(default, f) for f in TRAINING_CHOICES[group]})


# What a stage does to its training beyond epochs and learning rates, in the groups the paper protocol
# ablates together (paper/ablations.py). Every StageConfig field is either a schedule field or in a group.
TRAINING_CHOICES: dict[str, tuple[str, ...]] = {
    "title corruption": (*TITLE_POLICIES, "label_word_tasks"),
    "image augmentation": ("crop_scale", "flip", "color_jitter"),
    "modality loss": ("modality_loss",),
}
SCHEDULE_FIELDS = ("epochs", "lr_clip", "lr_sequence", "lr_modality", "lr_head")


def _default_stages() -> dict[str, StageConfig]:
    return {
        # Off (0 epochs) unless a config or an epochs override gives it some; it trains CLIP only.
        ALIGN: StageConfig(epochs=0, lr_clip=1e-5, lr_sequence=0.0, lr_modality=0.0, lr_head=0.0),
        "warmup": StageConfig(lr_clip=0.0),
        "end_to_end": StageConfig(lr_clip=1e-5),
        "tuning": StageConfig(lr_clip=0.0, lr_sequence=0.0),
    }


@dataclass
class TrainConfig:
    batch_size: int = 1024               # effective batch; reached by accumulating micro-batches
    micro_batch_size: int = 32
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    patience: int = 3                    # early stopping, in epochs without a better validation metric
    precision: str = "auto"              # one of PRECISIONS
    seed: int = 0
    target_precision: float = 0.9        # recall is measured at this precision
    monitor: str = "mean_recall_at_precision"
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)

    def stage_order(self) -> tuple[str, ...]:
        """The stages a training runs unless told which: align when it has epochs, then Algorithm 1's three."""
        return ALL_STAGES if self.stages[ALIGN].epochs > 0 else STAGES


@dataclass
class CMACLIPConfig:
    name: str = "paper-vit-b-32"
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    cma: CMAConfig = field(default_factory=CMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: dict[str, int] = field(default_factory=dict)  # task -> number of classes, set from the data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CMACLIPConfig":
        d = dict(d)
        train = dict(d.get("train", {}))
        stages = _default_stages()
        for name, s in train.pop("stages", {}).items():
            if name not in ALL_STAGES:
                raise ValueError(f"unknown stage {name!r}; stages are {ALL_STAGES}")
            # align's defaults freeze the CMA modules, so its entry is read over them, not over StageConfig()'s.
            base = dataclasses.asdict(stages[name]) if name == ALIGN else {}
            stages[name] = StageConfig(**{**base, **s})
        return cls(
            name=d.get("name", "custom"),
            clip=CLIPConfig(**d.get("clip", {})),
            cma=CMAConfig(**d.get("cma", {})),
            train=TrainConfig(**train, stages=stages),
            tasks={k: int(v) for k, v in d.get("tasks", {}).items()},
        )

    def with_tasks(self, tasks: dict[str, int]) -> "CMACLIPConfig":
        return dataclasses.replace(self, tasks=dict(tasks))


VARIANTS: dict[str, dict[str, Any]] = {
    "cma-clip": {},
    "no-modality-attention": {"modality_attention": False},
    "no-attention": {"modality_attention": False, "sequence_attention": False},
    "image-only": {"modalities": "image"},
    "text-only": {"modalities": "text"},
}


def with_variant(config: CMACLIPConfig, variant: str) -> CMACLIPConfig:
    """The config of an ablation variant (paper Table 6) or single-modality baseline."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return dataclasses.replace(config, cma=dataclasses.replace(config.cma, **VARIANTS[variant]))


def load_config(name_or_path: str | Path) -> CMACLIPConfig:
    """A config by name (`tiny`, `paper-vit-b-32`: files in cmaclip/configs/) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"config {name_or_path!r} not found; known configs: {known}")
    return CMACLIPConfig.from_dict(json.loads(path.read_text()))
