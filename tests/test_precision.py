"""The one precision policy: what 'auto' picks on CPU (bf16 where native; else int8 weights for scoring and
fp32 for training), how native bf16 is detected, and that training and scoring both follow it."""
from pathlib import Path

import pytest
import torch

from cmaclip import precision
from cmaclip.checkpoint import Checkpoint
from cmaclip.int8 import Int8Linear
from cmaclip.precision import resolve_device, resolve_precision
from pipeline.scoring.predictor import Lineage, Predictor
from tiny_training import TASKS, one_thread, tiny_config, tiny_model  # noqa: F401


def test_fixed_precisions_and_refusals():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp16 on CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu", inference=True)
    with pytest.raises(ValueError, match="inference"):
        resolve_precision("int8", "cpu")  # training: int8 weights have no backward
    with pytest.raises(ValueError, match="x86 CPU"):
        resolve_precision("int8", "cuda", inference=True)
    assert resolve_precision("int8", "cpu", inference=True) == "int8"


def test_device_auto_is_cuda_where_available_and_an_absent_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["cuda", "cpu", "cuda", "cuda:1"]
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ValueError, match="not 'mps'"):
        resolve_device("mps")


@pytest.mark.parametrize("bf16, int8, training, scoring", [(True, True, "bf16", "bf16"), (False, True, "fp32", "int8"),
                                                           (False, False, "fp32", "fp32")])
def test_auto_on_cpu_is_bf16_where_native_else_int8_for_scoring(monkeypatch, bf16, int8, training, scoring):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: bf16)
    monkeypatch.setattr(precision, "cpu_supports_int8", lambda: int8)
    assert resolve_precision("auto", "cpu") == training
    assert resolve_precision("auto", "cpu", inference=True) == scoring


def test_native_bf16_from_cpu_flags_where_onednn_cannot_say(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    real_path = Path

    def cpuinfo(flags):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(precision, "Path", lambda p: real_path(tmp_path / "cpuinfo")
                            if p == "/proc/cpuinfo" else real_path(p))

    cpuinfo("avx2 avx512f")
    assert not precision.cpu_supports_bf16()
    cpuinfo("avx512f avx512_bf16")
    assert precision.cpu_supports_bf16()
    cpuinfo("amx_tile amx_bf16")
    assert precision.cpu_supports_bf16()


@pytest.mark.parametrize("native, expected, dtype", [(True, "bf16", torch.bfloat16), (False, "int8", torch.float32)])
def test_scoring_follows_the_same_policy(monkeypatch, native, expected, dtype):
    if expected == "int8" and not precision.cpu_supports_int8():
        pytest.skip("no fbgemm int8 kernels (not x86)")
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    monkeypatch.setattr(precision, "cpu_supports_int8", lambda: True)
    cfg = tiny_config()
    labels = {task: [f"{task}{i}" for i in range(n)] for task, n in TASKS.items()}
    predictor = Predictor(tiny_model(cfg), Checkpoint(cfg, labels), Lineage("tiny", "1"), precision="auto")
    assert predictor.precision == expected == resolve_precision("auto", "cpu", inference=True)
    assert predictor.dtype == dtype == predictor.preprocessor.dtype
    assert predictor.model.towers.clip.visual.proj.dtype == dtype
    assert isinstance(predictor.model.towers.clip.visual.transformer.resblocks[0].mlp.c_fc, Int8Linear) is (not native)


def test_cli_refuses_an_unknown_precision_before_writing(tmp_catalog, tmp_path, capsys):
    from pipeline import cli
    out = tmp_path / "scores"
    code = cli.main(["score", "--catalog", tmp_catalog, "--model", str(tmp_path / "none"), "--out", str(out),
                     "--all", "--precision", "fp8"])
    assert code == 2 and "precision must be one of" in capsys.readouterr().err
    assert not out.exists()
