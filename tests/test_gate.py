"""The quality gate before publish: a run whose class distribution was shifted on purpose is not published
(and says why), a normal night is, `--force` publishes anyway; the abstention and quarantine limits. No
model: the prediction files are written directly (tests/publish_support.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.scoring import publish, report, versions
from pipeline.scoring.gate import GateFailed, Limits, check
from publish_support import finalized_run, prediction

COLORS = ["blue", "green", "red"]


def _night(out: Path, night: int, colors: list[str], **kwargs):
    run_id = f"night-{night}"
    rows = [prediction(f"p{i:03d}", run_id, night=night, color=c) for i, c in enumerate(colors)]
    return finalized_run(out, run_id, rows, night=night, **kwargs)


def test_the_gate_blocks_a_shifted_class_distribution_and_passes_a_normal_night(tmp_path, capsys):
    out = tmp_path / "out"
    usual = [COLORS[i % 3] for i in range(60)]
    _night(out, 1, usual)
    assert publish.publish(str(out), limits=Limits())["verdict"] == {"passed": True, "exceeded": []}
    normal = list(usual)
    normal[0], normal[1] = normal[1], normal[0]   # two products changed colour: the distribution did not
    _night(out, 2, normal)
    summary = publish.publish(str(out), limits=Limits())
    assert summary["verdict"]["passed"] and summary["version"] == 2
    before = (out / "published" / "latest.parquet").read_bytes()

    _night(out, 3, ["red"] * 48 + usual[48:])     # a shift on purpose: 80% red
    with pytest.raises(GateFailed, match=r"color: PSI \d+\.\d+ > 0\.25") as failed:
        publish.publish(str(out), limits=Limits())
    exceeded = failed.value.verdict.exceeded
    assert len(exceeded) == 1 and exceeded[0].startswith("color: PSI")  # the only limit it went over
    assert (out / "published" / "latest.parquet").read_bytes() == before and versions.current_number(str(out)) == 2
    assert (out / "_reports" / "run=night-3" / "summary.md").exists()  # the report the gate decided on

    assert cli.main(["publish", "--out", str(out)]) == 2
    assert "color: PSI" in capsys.readouterr().err
    assert cli.main(["publish", "--out", str(out), "--max-psi", "50"]) == 0   # the limit is a setting
    capsys.readouterr()
    assert cli.main(["publish", "--out", str(out), "--rollback"]) == 0
    capsys.readouterr()
    assert cli.main(["publish", "--out", str(out), "--force"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["forced"] and not forced["verdict"]["passed"] and forced["run_id"] == "night-3"
    current = versions.current(str(out))
    assert current.forced and current.gate_exceeded == forced["verdict"]["exceeded"]


def test_the_abstention_and_quarantine_limits(tmp_path):
    out = tmp_path / "out"
    rows = [prediction(f"p{i}", "night-1", style=None if i < 9 else "casual", style_top="casual")
            for i in range(10)]
    manifest = finalized_run(out, "night-1", rows, quarantined=5)
    made = report.build(str(out), manifest)
    verdict = check(made, manifest, Limits())
    assert not verdict.passed
    assert verdict.exceeded == ["quarantine rate 0.333 > 0.1 (5 of 15 rows)"]  # abstention: no limit by default
    assert check(made, manifest, Limits(max_quarantine_rate=0.4, max_abstention_rate=0.85)).exceeded == \
        ["style: abstention rate 0.900 > 0.85"]
    assert check(made, manifest, Limits(max_quarantine_rate=0.4, max_abstention_rate=0.9)).passed  # at the limit
    assert Limits.from_mapping({"max_psi": "0.5", "max_abstention_rate": None, "publish_anyway": True}) == \
        Limits(max_psi=0.5)
    with pytest.raises(ValueError, match="max_psi must be >= 0"):
        Limits(max_psi=-1)


def test_a_task_that_starts_abstaining_on_everything_drifts(tmp_path):
    """No absolute abstention limit by default, but abstention is one of the values the PSI compares."""
    out = tmp_path / "out"
    _night(out, 1, [COLORS[i % 3] for i in range(60)])
    publish.publish(str(out), limits=Limits())
    _night(out, 2, [None] * 60)
    with pytest.raises(GateFailed, match=r"color: PSI \d+\.\d+ > 0\.25") as failed:
        publish.publish(str(out), limits=Limits())
    assert len(failed.value.verdict.exceeded) == 1
