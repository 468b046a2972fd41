"""MLflow tracking of a training: one parent run, one nested run per stage with per-epoch metrics and
artifacts, the pyfunc model (same predictions in a fresh process), and SQLite under parallel writers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from cmaclip.checkpoint import is_checkpoint
from cmaclip.config import STAGES
from mlflow_support import EPOCHS, REPO_ROOT, fresh_process_predict, home, mlflow_home, sample_frame, trained  # noqa: F401,E501
from pipeline import reasons, settings
from pipeline.tracking import registry, stage_logging, tracker
from pipeline.training import trainer

pytestmark = pytest.mark.slow
TASKS = ("color", "pattern", "style")
EPOCH_METRICS = ["train/loss", "val/loss", "val/mean_accuracy", "val/mean_recall_at_precision",
                 *[f"train/loss/{t}" for t in TASKS],
                 *[f"val/{t}/{m}" for t in TASKS for m in ("accuracy", "macro_f1", "recall_at_precision", "image_weight")]]
ARTIFACTS = ["checkpoint/model.safetensors", "checkpoint/cmaclip.json", "config.json", "labels.json",
             "thresholds.json", "best_metrics.json",
             *[f"plots/{t}/{p}.png" for t in TASKS for p in ("precision_recall", "confusion", "lambda")]]




def _runs(c, kind_or_parent: dict[str, str]):
    experiment = c.get_experiment_by_name(tracker.TRAINING_EXPERIMENT)
    runs = c.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in kind_or_parent.items())]


def _artifacts(c, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in c.list_artifacts(run_id, path):
        found |= _artifacts(c, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_one_parent_run_with_config_dataset_and_versions(trained, home):
    c = tracker.client()
    parents = _runs(c, {tracker.KIND_TAG: "training"})
    assert [p.info.run_id for p in parents] == [trained["result"]["run_id"]]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    params = parent.data.params
    handle = trained["result"]["training"]
    assert params["config.cma.width"] == "64" and params["config.train.stages.warmup.epochs"] == "3"
    assert params["config.tasks.color"] == str(handle["config"]["tasks"]["color"]) == "12"
    assert params["dataset.fingerprint"] == handle["dataset_fingerprint"] and params["dataset.uri"] == trained["dataset"]
    assert params["code.version"] and params["versions.torch"] == torch.__version__.split("+")[0]
    assert {"versions.open_clip_torch", "versions.mlflow"} <= set(params)
    assert {"config.json", "labels.json", "stages.txt", "stages.json"} <= _artifacts(c, parent.info.run_id)
    assert "final/val/mean_accuracy" in parent.data.metrics


def test_three_nested_stage_runs_with_epoch_metrics_system_metrics_and_artifacts(trained, home):
    c = tracker.client()
    children = _runs(c, {tracker.PARENT_TAG: trained["result"]["run_id"]})
    assert sorted(r.data.tags[tracker.STAGE_TAG] for r in children) == sorted(STAGES)
    for run in children:
        stage, run_id = run.data.tags[tracker.STAGE_TAG], run.info.run_id
        assert run.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            steps = [m.step for m in c.get_metric_history(run_id, key)]
            assert sorted(steps) == list(range(EPOCHS[stage])), (stage, key, steps)
        if tracker.system_metrics_available():
            assert any(k.startswith("system/") for k in run.data.metrics), f"{stage}: no system metrics"
        assert run.data.params["stage.stage"] == stage
        assert set(ARTIFACTS) <= _artifacts(c, run_id), stage
    plot = mlflow.artifacts.download_artifacts(run_id=children[0].info.run_id, artifact_path="plots/color/lambda.png")
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_retried_stage_finds_its_run_and_a_finished_training_is_not_restarted(trained, home):
    c = tracker.client()
    parent = trained["result"]["run_id"]
    warmup = _runs(c, {tracker.PARENT_TAG: parent, tracker.STAGE_TAG: "warmup"})
    assert tracker.stage_run(parent, "warmup") == warmup[0].info.run_id
    handle = trained["result"]["training"]
    with pytest.raises(ValueError, match="finished training"):
        trainer.start_training(handle["config"], handle["dataset_uri"], handle["out_uri"],
                               stages=handle["stages"])


def test_the_first_stage_starts_from_the_seeded_model_whatever_ran_before(trained, home, monkeypatch):
    handle = trained["result"]["training"]
    started = []
    monkeypatch.setattr(trainer, "train_stage", lambda model, *a, **k: started.append(model.state_dict()))
    for _ in range(2):
        torch.rand(7)  # other work in the same process (an Airflow worker, a notebook) moves the global RNG
        trainer._train(handle, "warmup", trainer.as_config(handle["config"]), Path(home), "cpu", [])
    assert all(torch.equal(started[0][k], started[1][k]) for k in started[0])


def test_first_registered_version_is_champion(trained, home):
    assert trained["result"]["registered"] == {"name": "cmaclip", "version": "1", "alias": "champion",
                                               "run_id": trained["result"]["run_id"]}
    mv = tracker.client().get_model_version_by_alias("cmaclip", "champion")
    assert mv.run_id == trained["result"]["run_id"] and mv.tags[registry.VERDICT] == registry.FIRST_VERSION
    assert "**promoted**" in mv.description and trained["result"]["run_id"] in mv.description


def test_mlflow_opens_on_model_training_with_named_runs_the_dataset_and_one_curve(trained, home, tmp_path):
    c = tracker.client()
    experiment = c.get_experiment_by_name(tracker.TRAINING_EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = c.get_run(trained["result"]["run_id"])
    assert re.fullmatch(r"train \d{4}-\d\d-\d\d \d\d:\d\d → v\d+", parent.info.run_name), parent.info.run_name
    assert {r.info.run_name for r in _runs(c, {tracker.PARENT_TAG: parent.info.run_id})} == set(STAGES)
    [dataset_input] = parent.inputs.dataset_inputs
    assert dataset_input.dataset.digest == trained["result"]["training"]["dataset_fingerprint"]
    assert json.loads(dataset_input.dataset.source) == {"uri": trained["dataset"]}
    assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "training")}
    # One curve over the three stages: the epochs continue from stage to stage.
    total = sum(EPOCHS[s] for s in STAGES)
    for key in tracker.CURVE_METRICS:
        steps = sorted(m.step for m in c.get_metric_history(parent.info.run_id, tracker.CURVE_PREFIX + key))
        assert steps == list(range(total)), (key, steps)
    curve = c.download_artifacts(parent.info.run_id, "learning_curve.png", str(tmp_path))
    assert Path(curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pyfunc_from_the_registry_predicts_the_same_in_a_fresh_process(trained, home, tmp_path):
    uri = "models:/cmaclip@champion"
    frame = sample_frame(trained["dataset"])
    frame.to_pickle(tmp_path / "in.pkl")
    in_process = mlflow.pyfunc.load_model(uri).predict(frame)
    fresh_process_predict(uri, tmp_path / "in.pkl", tmp_path / "out.pkl",
                          {"MLFLOW_TRACKING_URI": settings.tracking_uri(), "HF_HUB_OFFLINE": "1"})
    fresh = pd.read_pickle(tmp_path / "out.pkl")
    pd.testing.assert_frame_equal(fresh.drop(columns="scored_at"), in_process.drop(columns="scored_at"))
    # One row out per row in; the broken image is reported, not dropped and not fatal.
    assert list(fresh["product_id"]) == list(frame["product_id"])
    broken = fresh.set_index("product_id").loc["broken-image"]
    assert broken["quarantine_reason"] == reasons.IMAGE_UNDECODABLE and pd.isna(broken["color_top"])
    scored = fresh[fresh["quarantine_reason"].isna()]
    assert len(scored) == len(frame) - 1 and scored["style_top"].notna().all()
    assert (scored["model_name"] == "cmaclip").all() and (scored["run_id"] == trained["result"]["run_id"]).all()
    # The pyfunc is the Predictor: same columns and values for the rows it could score.
    predictor = registry.load_predictor(uri)
    direct, quarantined = predictor.predict_frame(frame)
    assert list(quarantined["product_id"]) == ["broken-image"]
    for column in predictor.output_columns:
        if pd.api.types.is_float_dtype(direct[column]):
            # Batches differ by the broken row, and a matmul's last bits depend on the batch it runs in.
            assert direct[column].to_numpy() == pytest.approx(scored[column].to_numpy(), rel=1e-5), column
        else:
            assert list(direct[column]) == list(scored[column]), column
    info = mlflow.models.get_model_info(uri)
    assert [c.name for c in info.signature.inputs.inputs] == ["product_id", "title", "image"]


def test_resolve_checkpoint_for_alias_version_and_run(trained, home):
    by_alias = registry.resolve_checkpoint("models:/cmaclip@champion")
    by_version = registry.resolve_checkpoint("models:/cmaclip/1")
    by_run = registry.resolve_checkpoint(f"runs:/{trained['result']['run_id']}/model")
    assert (by_alias.name, by_alias.version) == ("cmaclip", "1") and by_alias.checkpoint == by_version.checkpoint
    assert is_checkpoint(by_alias.checkpoint) and is_checkpoint(by_run.checkpoint)
    trained_weights = (Path(trained["result"]["checkpoint"]) / "model.safetensors").read_bytes()
    assert (by_run.checkpoint / "model.safetensors").read_bytes() == trained_weights
    assert (by_alias.checkpoint / "model.safetensors").read_bytes() == trained_weights


def test_checkpoint_snapshots_round_trip_through_a_remote_store(trained, tmp_path):
    """A remote out_uri: an epoch's snapshot is published, and a fresh worker gets it back whole."""
    stage = Path(trained["result"]["training"]["out_uri"]) / "stages" / "warmup"
    remote = f"memory://cmaclip-test/{tmp_path.name}/stages/warmup"
    trainer._publish_snapshot(stage, remote, epochs=3, improved=True)
    local = tmp_path / "worker" / "warmup"
    trainer._fetch_snapshot(remote, local)
    for sub in ("last", "best"):
        for f in (stage / sub).iterdir():
            assert (local / sub / f.name).read_bytes() == f.read_bytes(), f
    trainer._fetch_snapshot(remote, local)  # already as new: a no-op


PARALLEL_WRITER = textwrap.dedent("""
    import sys
    import mlflow
    from pipeline import settings
    settings.configure()
    experiment = settings.experiment_id("parallel")
    with mlflow.start_run(experiment_id=experiment, run_name=f"writer-{sys.argv[1]}"):
        mlflow.log_params({f"p{i}": i for i in range(20)})
        for step in range(30):
            mlflow.log_metrics({"a": step, "b": 2 * step}, step=step)
        mlflow.log_text("done", "done.txt")
""")


def test_parallel_writers_on_a_fresh_sqlite_store(tmp_path):
    """Mapped Airflow tasks: processes that create the store, the experiment and runs at the same time."""
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
           "CMACLIP_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO_ROOT)}
    writers = [subprocess.Popen([sys.executable, "-c", PARALLEL_WRITER, str(i)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = [w.communicate(timeout=300) for w in writers]
    assert [w.returncode for w in writers] == [0] * 4, [err[-2000:] for _, err in outputs]
    with mlflow_home(tmp_path / "home"):
        c = tracker.client()
        experiment = c.get_experiment_by_name("parallel")
        runs = c.search_runs([experiment.experiment_id])
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        assert all(len(c.get_metric_history(r.info.run_id, "b")) == 30 for r in runs)
        assert len(c.search_experiments(filter_string="name = 'parallel'")) == 1


def test_more_params_and_metrics_than_one_request_takes_and_plots_as_figures(tmp_path):
    """Over MLflow's per-request limits (100 params, 1000 metrics): all arrive. Plots land as PNG artifacts
    under plots/<task>/ for each labelled task only."""
    import numpy as np

    from cmaclip.evaluate import Predictions

    with mlflow_home(tmp_path / "home"):
        c = tracker.client()
        run_id = c.create_run(settings.experiment_id("limits")).info.run_id
        tracker.log_params(c, run_id, {f"p{i}": str(i) for i in range(250)})
        tracker.log_metrics(c, run_id, {f"m{i}": float(i) for i in range(2500)} | {"inf": float("inf")}, step=3)
        run = c.get_run(run_id)
        assert run.data.params == {f"p{i}": str(i) for i in range(250)}
        assert run.data.metrics == {f"m{i}": float(i) for i in range(2500)}
        rng = np.random.default_rng(0)
        probs = rng.dirichlet(np.ones(3), size=20).astype(np.float32)
        predictions = Predictions([f"id{i}" for i in range(20)], {"color": probs, "style": probs},
                                  {"color": rng.integers(0, 3, 20), "style": np.full(20, -1)},
                                  {t: rng.random(20).astype(np.float32) for t in ("color", "style")})
        titles = {f"id{i}": "red cotton shirt" for i in range(20)}
        labels = {t: ["red", "blue", "green"] for t in ("color", "style")}
        stage_logging.log_plots(c, run_id, predictions, titles, labels, 0.9)
        assert _artifacts(c, run_id) == {f"plots/color/{p}.png" for p in ("precision_recall", "confusion", "lambda")}
        plot = c.download_artifacts(run_id, "plots/color/confusion.png", str(tmp_path))
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_hung_schema_lock_holder_gives_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    db = tmp_path / "home" / "mlflow.db"
    db.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        with FileLock({str(db) + '.lock'!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(settings, "SCHEMA_LOCK_TIMEOUT_S", 0.5)
        with pytest.raises(TimeoutError, match="another process has held it"):
            settings.configure(f"sqlite:///{db}")
        assert not db.exists()  # nothing was built without the lock
    finally:
        holder.kill()
        holder.wait()
    settings.configure(f"sqlite:///{db}")  # released with the holder's death
    assert db.exists()
