"""What only a GPU can check (bench/gpu.sh runs these with `-m cuda`; without a CUDA device they skip): the
precision 'auto' picks there, bf16 scoring on the GPU agreeing with fp32 on the CPU, the loader pinning its
batches for the copy, a sharded run on the GPU reconciling, `cmaclip score` on it by default, and a training
stage on the device."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cmaclip.checkpoint import load_checkpoint
from cmaclip.precision import resolve_precision
from cmaclip.train import train_stage
from pipeline.scoring import distributor, planner, reader
from pipeline.scoring.predictor import Predictor
from tiny_training import loader, samples, tiny_config, tiny_model

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tmp_catalog) -> str:
    """test_scoring's tiny model, trained briefly so its top two classes are not within rounding."""
    from test_scoring import trained_checkpoint

    return trained_checkpoint(tmp_path_factory.mktemp("model"), tmp_catalog)


def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_and_int8_is_refused():
    assert resolve_precision("auto", "cuda", inference=True) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    with pytest.raises(ValueError, match="x86 CPU"):
        resolve_precision("int8", "cuda", inference=True)


def test_bf16_on_cuda_agrees_with_fp32_on_cpu(checkpoint, tmp_catalog):
    from test_scoring import TASKS

    frame = pq.read_table(tmp_catalog).to_pandas()
    reference, _ = Predictor.from_checkpoint(checkpoint, precision="fp32").predict_frame(frame)
    gpu = Predictor.from_checkpoint(checkpoint, device="cuda")
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    assert gpu.model.towers.clip.visual.proj.dtype == torch.bfloat16
    assert next(gpu.model.heads.parameters()).dtype == torch.float32  # the decision stays fp32
    got, _ = gpu.predict_frame(frame)
    agreement = np.mean([(reference[f"{t}_top"] == got[f"{t}_top"]).mean() for t in TASKS])
    assert len(got) == len(reference) >= 300 and agreement >= 0.995, agreement


def test_the_loader_pins_batches_and_a_cuda_run_reconciles(checkpoint, tmp_catalog, tmp_path):
    predictor = Predictor.from_checkpoint(checkpoint, device="cuda")
    shard = planner.plan_shards(tmp_catalog, 100).shards[0]
    batch = next(iter(reader.batch_loader(shard, predictor.preprocessor, 32, workers=2, pin_memory=True)))
    assert batch.pixels.is_pinned() and batch.tokens.is_pinned()
    assert reader.default_workers(predictor.device) >= 1  # on a GPU the CPU is free to decode
    summary = distributor.score(tmp_catalog, predictor, str(tmp_path / "out"), rows_per_shard=100, batch_size=64,
                                workers=2, progress=False)
    assert summary["precision"] == "bf16" and summary["shards_run"] == 4
    assert summary["rows_in"] == 400 == summary["predicted"] + summary["quarantined"]


def test_the_cli_scores_on_the_gpu_by_default_and_on_the_cpu_when_asked(checkpoint, tmp_catalog, tmp_path, capsys):
    from pipeline import cli

    base = ["score", "--catalog", tmp_catalog, "--model", checkpoint, "--all", "--rows-per-shard", "1000"]
    devices = []
    for extra in ([], ["--device", "cpu", "--precision", "fp32"]):
        assert cli.main([*base, "--out", str(tmp_path / f"out{len(devices)}"), *extra]) == 0
        devices.append(json.loads(capsys.readouterr().out)["device"])
    assert devices == ["cuda", "cpu"]


def test_a_training_stage_runs_on_cuda_and_its_checkpoint_loads_on_cpu(tmp_path):
    cfg = tiny_config(precision="auto", batch_size=32, micro_batch_size=16)
    cfg.train.stages["end_to_end"].epochs = 2
    train, val = loader(samples(cfg, 64, 1), 16, shuffle=True), loader(samples(cfg, 32, 2), 16)
    model = tiny_model(cfg)
    result = train_stage(model, "end_to_end", cfg, train, val, tmp_path, device="cuda")
    assert next(model.parameters()).is_cuda and result.epochs_run == 2
    assert all(np.isfinite(epoch["train/loss"]) for epoch in result.history)
    restored, _ = load_checkpoint(result.best_checkpoint)
    assert not next(restored.parameters()).is_cuda
