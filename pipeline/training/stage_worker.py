"""The torchrun entry point for one training stage: `python -m torch.distributed.run ... -m
pipeline.training.stage_worker --training T --stage S --result R` (started by `pipeline.training.launch`).

Each rank joins the process group (NCCL with one GPU per rank, gloo on CPU) and calls
`pipeline.training.trainer.run_stage`, which under DDP trains on every rank and leaves the MLflow run, the
snapshots and the artifacts to rank 0. Rank 0 writes run_stage's result to R as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Sequence


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.training.stage_worker", description=__doc__)
    p.add_argument("--training", required=True, help="JSON file: the handle from start_training")
    p.add_argument("--stage", required=True)
    p.add_argument("--result", required=True, help="where rank 0 writes run_stage's result (JSON)")
    p.add_argument("--epochs", type=int, default=None)
    return p.parse_args(argv)


def _init_process_group(device: str) -> str:
    """Join torchrun's group; returns the device string this rank trains on."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        # Before any CUDA work: "cuda" then means this rank's own GPU (DDP's device_ids follow it).
        torch.cuda.set_device(local_rank)
    # A rank waits at most this long for the others (e.g. while rank 0 uploads a snapshot) before failing.
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    return "cuda" if use_cuda else "cpu"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    import torch.distributed as dist

    from cmaclip.train import PrintCallback

    from .trainer import run_stage

    training = json.loads(Path(args.training).read_text())
    training["device"] = _init_process_group(training.get("device", "auto"))
    try:
        # Epoch lines reach the launcher (and the Airflow log); callbacks run on rank 0 only.
        result = run_stage(training, args.stage, epochs=args.epochs,
                           callbacks=[PrintCallback(lambda line: print(line, flush=True))])
        if dist.get_rank() == 0:
            tmp = Path(args.result + ".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(args.result)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
