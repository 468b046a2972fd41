"""Run one training stage on N processes: `torchrun` (DDP) when N > 1, the plain in-process call when N = 1.

The retrain DAG (and anyone else) calls `run_stage_distributed(training, stage, nproc)` in place of
`trainer.run_stage(training, stage)`; the return value is the same dict. With N > 1 this process starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m pipeline.training.stage_worker ...

(torchrun, from the interpreter running this code so the ranks import the same environment), streams the
ranks' output into this process's stdout (the Airflow task log), and reads back rank 0's result. One node:
`--standalone` rendezvouses on localhost; the GPUs of the worker machine are the devices (one per rank),
or N CPU processes over gloo where there is no GPU.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from .. import settings

if TYPE_CHECKING:  # torch is imported only where a stage runs
    from cmaclip.train import Callback

WORKER_MODULE = "pipeline.training.stage_worker"


def resolve_nproc(nproc: int | str) -> int:
    """An int, or "gpu" (one process per visible CUDA device) or "auto" (that, or 1 without a GPU)."""
    if isinstance(nproc, str) and nproc in ("gpu", "auto"):
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc == "gpu" and count == 0:
            raise ValueError("nproc='gpu' but this machine has no CUDA device")
        return max(count, 1)
    n = int(nproc)
    if n < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc!r}")
    return n


def torchrun_command(nproc: int, handle: str, stage: str, result: str, epochs: int | None = None) -> list[str]:
    """The torchrun command line for one stage (public so a Kubernetes pod spec can reuse it)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               # A failed rank fails the stage: the Airflow task's retry resumes from the last epoch,
               # which is cheaper to reason about than torchrun restarting ranks underneath it.
               "--max-restarts", "0",
               "-m", WORKER_MODULE, "--training", handle, "--stage", stage, "--result", result]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    return command


def _worker_env(base: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    # The ranks import `pipeline` from where this process did, even where the project is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(settings.IMPORT_ROOT), env.get("PYTHONPATH", "")) if p)
    # Every rank must log to the MLflow store this process uses (run_stage checks it).
    env.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri())
    env.setdefault("CMACLIP_HOME", str(settings.home()))
    return env


def _stream(command: Sequence[str], env: Mapping[str, str], tail: int = 200) -> tuple[int, str]:
    """Run `command`, forwarding its output line by line; return the exit code and the last lines."""
    last: collections.deque[str] = collections.deque(maxlen=tail)
    with subprocess.Popen(command, env=dict(env), cwd=settings.IMPORT_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            last.append(line)
        sys.stdout.flush()
        return proc.wait(), "".join(last)


def run_stage_distributed(training: Mapping[str, Any], stage: str, nproc: int | str = 1, *,
                          epochs: int | None = None, env: Mapping[str, str] | None = None,
                          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train `stage` of `training` (the handle from `pipeline.training.trainer.start_training`) on `nproc`
    processes and return what `pipeline.training.trainer.run_stage` returns. Resumable like run_stage: a retry
    continues after the last completed epoch, also with another process count. `callbacks` hook into the
    training in this process (N = 1); under torchrun, rank 0 prints its epoch lines into this output instead."""
    n = resolve_nproc(nproc)
    if n == 1:
        from .trainer import run_stage
        return run_stage(training, stage, epochs=epochs, callbacks=callbacks)
    with tempfile.TemporaryDirectory(prefix="cmaclip-launch-") as tmp:
        handle, result = Path(tmp) / "training.json", Path(tmp) / "result.json"
        handle.write_text(json.dumps(dict(training)))
        code, output = _stream(torchrun_command(n, str(handle), stage, str(result), epochs), _worker_env(env))
        if code != 0 or not result.exists():
            raise RuntimeError(f"torchrun ({n} processes) for stage {stage!r} failed with exit code {code}; "
                               f"last output:\n{output[-6000:]}")
        return json.loads(result.read_text())
