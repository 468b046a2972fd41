"""Where the paper protocol's results go: paper.json (every number), paper.md (the report) and one MLflow
run in the `cmaclip-paper` experiment with the figures as metrics and the files as artifacts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import settings

from .options import Options

EXPERIMENT = "cmaclip-paper"


def finite(value: Any) -> Any:
    """NaN and infinity become None: strict JSON has neither, and MLflow cannot store them faithfully."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def figures(results: dict[str, Any]) -> dict[str, float]:
    """Every number of the tables as flat `models.<model>.<task>.<metric>` /
    `robustness.<model>.<condition>.<task>.<metric>` / `ablations.<name>.<condition>.<metric>` ... keys
    (for MLflow metrics)."""
    from pipeline.tracking.tracker import flatten

    ablations = {row["name"]: row["test"] for row in results.get("ablations", {}).get("rows", [])}
    flat = flatten({"models": {k: m["test"] for k, m in results["models"].items() if "test" in m},
                    "robustness": results["robustness"], "calibration": results.get("calibration", {}),
                    "contributions": results.get("contributions", {}), "ablations": ablations,
                    "noise": results["noise"], "timing": results["timing"]})
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and v is not None}


def write_reports(results: dict[str, Any], opts: Options) -> list[Path]:
    """paper.json and paper.md under results_dir; returns them and the attention PNGs."""
    from .report import render

    out = Path(opts.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(finite(results), indent=1, sort_keys=True) + "\n")
    (out / "paper.md").write_text(render(finite(results), opts.command))
    return [out / "paper.json", out / "paper.md", *(out / a["png"] for a in results["attention"])]


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


def log_mlflow(results: dict[str, Any], files: list[Path]) -> str:
    """One run in the `cmaclip-paper` experiment: protocol as params, every figure as a metric, the
    report, its JSON and the attention maps as artifacts. Returns the run id."""
    from pipeline.tracking import tracker

    c = tracker.client()
    run = c.create_run(settings.experiment_id(EXPERIMENT), run_name=f"paper-{results['protocol']['config']}",
                       tags={tracker.KIND_TAG: "paper", "mlflow.source.name": "paper.protocol"})
    run_id = run.info.run_id
    protocol = {k: v for k, v in results["protocol"].items() if k != "config_dict"}
    tracker.log_params(c, run_id, {k: _param(v) for k, v in tracker.flatten(protocol).items()})
    tracker.log_metrics(c, run_id, figures(finite(results)), step=0)
    c.log_dict(run_id, results["protocol"]["config_dict"], "config.json")
    for path in files:
        c.log_artifact(run_id, str(path), "attention" if path.suffix == ".png" else None)
    c.set_terminated(run_id, "FINISHED")
    return run_id
