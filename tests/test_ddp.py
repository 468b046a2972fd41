"""Multi-process training: `pipeline.training.launch` runs a stage under torchrun (2 CPU processes over gloo, DDP)
and it reaches the quality of the same stage trained in one process.

Same data, config, seed and effective batch (64 = 2 accumulation steps of 32 in one process, 1 step of
32 per rank under DDP); only the data order differs (each rank reads its own shard), so the curves agree
closely but not exactly: the comparison is on metrics within a tolerance, not on weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cmaclip.config import load_config
from pipeline.training import launch

EPOCHS = 10
TASKS = ["color", "pattern", "style"]
# Mean chance accuracy over the synthetic tasks (12 colors, 4 patterns, 6 styles) is about 0.17.
LEARNED = 0.3


def _history(result: dict) -> dict:
    state = Path(result["checkpoint"]).parent / "last" / "state.json"
    return json.loads(state.read_text())


@pytest.fixture(scope="module")
def dataset(tmp_catalog, tmp_path_factory) -> str:
    from pipeline.ingest.dataset import ingest
    out = tmp_path_factory.mktemp("ddp-dataset")
    # A larger validation split than the default 10%: 40 rows would make the comparison mostly noise.
    ingest(tmp_catalog, TASKS, str(out), splits=(0.6, 0.3, 0.1))
    return str(out)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An embedded MLflow (SQLite) under a fresh CMACLIP_HOME, shared with the torchrun ranks via env."""
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def one_thread():
    # Fair and fast on a small shared machine: torchrun gives each rank one thread, so does this.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_torchrun_two_processes_reaches_single_process_quality(dataset, home, one_thread):
    from pipeline.training.trainer import start_training

    # Both runs train every epoch: early stopping would compare runs of different lengths.
    config = dataclasses.replace(load_config("tiny"), train=dataclasses.replace(load_config("tiny").train,
                                                                                patience=EPOCHS))

    def train(name: str, nproc: int) -> dict:
        handle = start_training(config, dataset, str(home / name), stages=["warmup"], epochs=EPOCHS,
                                device="cpu", run_name=name)
        return launch.run_stage_distributed(handle, "warmup", nproc)

    single, ddp = train("single", 1), train("ddp", 2)

    # It really ran as two DDP ranks that together saw the whole training split once per epoch.
    state_1, state_2 = _history(single), _history(ddp)
    assert state_1["world_size"] == 1 and state_2["world_size"] == 2
    samples_1 = state_1["state"]["history"][-1]["train/samples"]
    samples_2 = state_2["state"]["history"][-1]["train/samples"]
    assert samples_1 - 2 <= samples_2 <= samples_1  # DDP drops at most world-1 rows to keep ranks equal

    # Rank 0's result is the same contract as run_stage's: MLflow run, checkpoint, metrics.
    assert ddp["stage"] == "warmup" and ddp["epochs_run"] == EPOCHS and ddp["run_id"]
    assert (Path(ddp["checkpoint"]) / "cmaclip.json").is_file()

    # Both learned, and DDP got as far as the single process.
    acc_1, acc_2 = single["metrics"]["mean_accuracy"], ddp["metrics"]["mean_accuracy"]
    assert acc_1 > LEARNED and acc_2 > LEARNED, (acc_1, acc_2)
    assert abs(acc_2 - acc_1) <= 0.12, (acc_1, acc_2)
    loss_1 = state_1["state"]["history"][-1]["train/loss"]
    loss_2 = state_2["state"]["history"][-1]["train/loss"]
    assert abs(loss_2 - loss_1) <= 0.08 * loss_1, (loss_1, loss_2)

    # Rank 0 logged the stage run, with the DDP world size among its params.
    import mlflow
    params = mlflow.get_run(ddp["run_id"]).data.params
    assert params["stage.world_size"] == "2" and params["stage.accumulation"] == "1"
    assert mlflow.get_run(single["run_id"]).data.params["stage.world_size"] == "1"


def test_one_process_is_the_plain_in_process_call(monkeypatch):
    from pipeline.training import trainer

    calls, hook = [], object()
    monkeypatch.setattr(trainer, "run_stage", lambda t, s, epochs=None, callbacks=():
                        calls.append((t, s, epochs, list(callbacks))) or {"ok": 1})
    assert launch.run_stage_distributed({"run_id": "r"}, "warmup", 1, epochs=2, callbacks=[hook]) == {"ok": 1}
    assert calls == [({"run_id": "r"}, "warmup", 2, [hook])]


def test_torchrun_command_and_process_counts():
    command = launch.torchrun_command(4, "/t/training.json", "tuning", "/t/result.json", epochs=3)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "4" and "--standalone" in command
    assert command[command.index("-m", 3) + 1] == "pipeline.training.stage_worker"
    assert command[-2:] == ["--epochs", "3"]
    assert launch.resolve_nproc(3) == 3 and launch.resolve_nproc("2") == 2
    assert launch.resolve_nproc("auto") == max(torch.cuda.device_count(), 1)
    with pytest.raises(ValueError):
        launch.resolve_nproc(0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            launch.resolve_nproc("gpu")


@pytest.mark.slow
def test_failed_rank_fails_the_stage_with_its_output(tmp_path, monkeypatch):
    # A handle whose tracking store differs from the environment's: every rank refuses to start, and
    # the launcher raises with the ranks' own error message.
    monkeypatch.setenv("CMACLIP_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    handle = {"run_id": "x", "tracking_uri": "sqlite:////nonexistent/elsewhere.db", "stages": ["warmup"],
              "device": "cpu", "out_uri": str(tmp_path / "out")}
    with pytest.raises(RuntimeError, match=r"(?s)torchrun .*failed.*logs to sqlite:////nonexistent"):
        launch.run_stage_distributed(handle, "warmup", 2)
