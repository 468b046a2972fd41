"""What the paper protocol can be asked to do: its options and their command-line flags, shared by
`cmaclip-paper` (`python -m paper`) and `bench/paper.py`. Light on imports, so the CLI starts fast."""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cmaclip.config import ALL_STAGES, PRECISIONS
from pipeline import settings

# Defaults for a source checkout: the shared fashion-small catalog beside the repo, results in bench/results.
# Installed from a wheel there is neither: --catalog is required and results go under the data directory.
FASHION_SMALL = (settings.REPO_ROOT.parent / "shared" / "data" / "fashion-small" / "products.parquet"
                 if settings.REPO_ROOT else None)
TASKS = ("color", "article_type", "usage")
VARIANTS = ("cma-clip", "no-modality-attention", "no-attention", "image-only", "text-only")
STAGES = ALL_STAGES  # cmaclip.config imports no torch


def _results_dir() -> Path:
    return settings.REPO_ROOT / "bench" / "results" if settings.REPO_ROOT else settings.home() / "paper" / "results"


@dataclass
class Options:
    catalog: str = str(FASHION_SMALL or "")
    config: str | None = None              # default: paper-cpu-small, or paper-vit-b-32 with --pretrained
    pretrained: str | None = None
    tasks: tuple[str, ...] = TASKS
    work_dir: str = field(default_factory=lambda: str(settings.home() / "paper"))
    results_dir: str = field(default_factory=lambda: str(_results_dir()))
    seed: int = 0
    swap_seed: int = 1
    limit: int | None = None               # first N catalog rows in sha256(product_id) order (smoke tests)
    epochs: dict[str, int] = field(default_factory=dict)   # stage -> epochs, overrides the config
    contrastive_epochs: int = 4
    contrastive_lr: float = 5e-4
    attention_examples: int = 6
    variants: tuple[str, ...] = VARIANTS
    ablations: bool = True                 # retrain CMA-CLIP without each training choice the config turns on
    precision: str | None = None           # overrides config.train.precision
    threads: str = "auto"                  # torch threads: a number, or "auto" (chosen by load each epoch)
    eval_batch_size: int = 256
    device: str = "cpu"                    # "cuda" for the paper's setting where a GPU exists
    mlflow: bool = True
    command: str = "python bench/paper.py"

    @property
    def config_name(self) -> str:
        return self.config or ("paper-vit-b-32" if self.pretrained else "paper-cpu-small")


def _epochs(text: str) -> dict[str, int]:
    """'warmup=1,end_to_end=2' -> {'warmup': 1, 'end_to_end': 2}; align=N adds the catalog pre-training."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    out = {k.strip(): int(v) for k, v in pairs}
    unknown = set(out) - set(STAGES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
    return out


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = set(names) - set(VARIANTS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Options()
    p.add_argument("--catalog", default=d.catalog or None, required=not d.catalog,
                   help="catalog Parquet (default in a checkout: the shared fashion-small)")
    p.add_argument("--config", default=None, help="config name or JSON path "
                   "(default: paper-cpu-small; paper-vit-b-32 when --pretrained is given)")
    p.add_argument("--pretrained", default=None, help="local CLIP weights (the paper's setting); "
                   "without it CLIP starts from random weights and raw CLIP zero-shot is not run")
    p.add_argument("--tasks", default=",".join(d.tasks), help="comma-separated label columns")
    p.add_argument("--work-dir", default=d.work_dir, help="dataset and checkpoints (resumable)")
    p.add_argument("--results-dir", default=d.results_dir, help="paper.md, paper.json, attention/*.png")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--swap-seed", type=int, default=d.swap_seed)
    p.add_argument("--limit", type=int, default=None, help="first N catalog rows in hash order (smoke runs)")
    p.add_argument("--epochs", type=_epochs, default={}, help="override stage epochs, e.g. warmup=1,tuning=1")
    p.add_argument("--contrastive-epochs", type=int, default=d.contrastive_epochs)
    p.add_argument("--contrastive-lr", type=float, default=d.contrastive_lr)
    p.add_argument("--attention-examples", type=int, default=d.attention_examples)
    p.add_argument("--variants", type=_variants, default=d.variants, help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=d.ablations,
                   help="retrain CMA-CLIP without each training choice the config turns on (title corruption, "
                   "image augmentation, modality loss per stage; align), reusing the full run's earlier stages")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="overrides the config's (fp16: GPU only)")
    p.add_argument("--threads", default=d.threads, help="torch threads: N, or auto (by machine load, per epoch)")
    p.add_argument("--device", default=d.device, help="cpu, or cuda for the paper's setting")
    p.add_argument("--no-mlflow", action="store_true", help="skip the MLflow run")


def options_from_args(args: argparse.Namespace, command: str) -> Options:
    return Options(catalog=args.catalog, config=args.config, pretrained=args.pretrained,
                   tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), work_dir=args.work_dir,
                   results_dir=args.results_dir, seed=args.seed, swap_seed=args.swap_seed, limit=args.limit,
                   epochs=args.epochs, contrastive_epochs=args.contrastive_epochs,
                   contrastive_lr=args.contrastive_lr, attention_examples=args.attention_examples,
                   variants=args.variants, ablations=args.ablations, threads=args.threads, device=args.device,
                   precision=args.precision, mlflow=not args.no_mlflow, command=command)


def from_command_line(argv: Sequence[str], program: str, description: str) -> Options:
    """The options `argv` asks for; `program` (how it was run) heads the command recorded with the results,
    so the report says how to reproduce it."""
    parser = argparse.ArgumentParser(prog=program.split()[-1], description=description)
    add_arguments(parser)
    command = " ".join(["HF_HUB_OFFLINE=1", program, *map(shlex.quote, argv)])
    return options_from_args(parser.parse_args(argv), command)
