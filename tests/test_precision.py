"""The one precision policy: what 'auto' picks on CPU, how native bf16 is detected, and that training and
scoring both follow it."""
from pathlib import Path

import pytest
import torch

from cmaclip import precision
from cmaclip.checkpoint import Checkpoint
from cmaclip.precision import resolve_precision
from pipeline.scoring.predictor import Lineage, Predictor
from tiny_training import TASKS, one_thread, tiny_config, tiny_model  # noqa: F401


def test_fixed_precisions_and_refusals():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="fp16 on CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("int8", "cpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_is_bf16_only_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == expected


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


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_scoring_follows_the_same_policy(monkeypatch, native, dtype):
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: native)
    cfg = tiny_config()
    labels = {task: [f"{task}{i}" for i in range(n)] for task, n in TASKS.items()}
    predictor = Predictor(tiny_model(cfg), Checkpoint(cfg, labels), Lineage("tiny", "1"), precision="auto")
    assert predictor.precision == resolve_precision("auto", "cpu")
    assert predictor.dtype == dtype == predictor.preprocessor.dtype
    assert predictor.model.towers.clip.visual.proj.dtype == dtype


def test_cli_refuses_an_unknown_precision_before_writing(tmp_catalog, tmp_path, capsys):
    from pipeline import cli
    out = tmp_path / "scores"
    code = cli.main(["score", "--catalog", tmp_catalog, "--model", str(tmp_path / "none"), "--out", str(out),
                     "--all", "--precision", "fp8"])
    assert code == 2 and "precision must be one of" in capsys.readouterr().err
    assert not out.exists()
