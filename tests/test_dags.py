"""The Airflow DAGs: they load cleanly and fast, and `dag.test()` runs both end to end on a tiny catalog,
through a retried training stage and a rerun of an interrupted scoring run.

conftest's `airflow_env` points every variable that locates state (AIRFLOW_*, CMACLIP_HOME, MLflow) at a
fresh folder for the module, and rebinds Airflow's DB engine should another module have imported airflow first. `dag.test()` runs the tasks in this process,
which lets a test inject faults by wrapping pipeline functions (the task bodies look them up at call time):
the failures are real exceptions inside real task attempts, and Airflow's retries handle them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.orchestration import airflow_home, airflow_tasks

REPO_ROOT = Path(__file__).resolve().parents[1]
DAG_FILES = sorted((REPO_ROOT / "dags").glob("*.py"))
DAG_IDS = {"cmaclip_retrain", "cmaclip_nightly_scoring"}
EPOCHS = {"warmup": 1, "end_to_end": 2, "tuning": 1}


@pytest.fixture(scope="module")
def dagbag(airflow_env):
    from airflow.dag_processing.dagbag import DagBag
    return DagBag(dag_folder=str(REPO_ROOT / "dags"), safe_mode=False)


def test_dagbag_loads_both_dags_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_IDS <= set(dagbag.dag_ids)


def test_retrain_dag_shape(dagbag):
    dag = dagbag.dags["cmaclip_retrain"]
    order = ["plan_ingest", "stage_group", "finish_ingest", "align", "warmup", "end_to_end", "tuning", "evaluate",
             "register", "compare", "promote"]
    for upstream, downstream in zip(["validate", *order], order):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    # Ingest maps over the plan's groups: one task per group, each retried alone.
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    stage = dag.get_task("stage_group")
    assert isinstance(stage, MappedOperator) and stage.map_index_template
    assert "plan_ingest" in stage.upstream_task_ids and stage.retries >= 1
    assert not isinstance(dag.get_task("finish_ingest"), MappedOperator)
    assert not dag.timetable.can_be_scheduled  # manual trigger only
    assert {dag.get_task(t).pool for t in ("align", "warmup", "end_to_end", "tuning")} == {airflow_home.GPU_POOL}
    assert all(dag.get_task(t).retries >= 1 for t in order) and dag.get_task("validate").retries == 0
    # The training state is passed on, not logged: each stage logs its epochs and a table instead.
    assert not any(dag.get_task(t).show_return_value_in_logs for t in ("align", "warmup", "end_to_end", "tuning"))
    assert dag.get_task("warmup").retry_exponential_backoff > 1
    assert {"catalog_uri", "tasks", "config", "epochs", "target_precision", "model_name", "promote",
            "training_processes"} <= set(dag.params)
    # The JSON schema the trigger form shows also rejects bad values.
    from airflow.sdk.exceptions import ParamValidationError

    for name, bad in {"target_precision": 1.5, "tasks": [], "epochs": {"warmup": 0}, "promote": "yes",
                      "model_name": "no spaces please", "training_processes": 0}.items():
        with pytest.raises(ParamValidationError):
            dag.params.get_param(name).resolve(bad)
    with pytest.raises(ParamValidationError):
        dag.params.get_param("epochs").resolve({"align": -1})
    assert dag.params.get_param("epochs").resolve({"warmup": 2}) == {"warmup": 2}
    assert dag.params.get_param("epochs").resolve({"align": 0}) == {"align": 0}   # align off where a config has it


def test_a_stage_outside_the_training_passes_the_state_on(monkeypatch):
    from pipeline.training import launch

    calls = []

    def fake_stage(training, stage, processes, callbacks=()):
        calls.append(stage)
        return {"stage": stage, "run_id": "r1", "metrics": {}, "epochs_run": 1, "best_epoch": 0}

    monkeypatch.setattr(launch, "run_stage_distributed", fake_stage)
    state = {"training": {"stages": ["warmup", "end_to_end", "tuning"]}, "results": []}
    assert airflow_tasks.train_stage(state, airflow_tasks.ALIGN) == state and calls == []   # align off: no-op
    state["training"]["stages"] = [airflow_tasks.ALIGN, *airflow_tasks.STAGES]
    assert [r["stage"] for r in airflow_tasks.train_stage(state, airflow_tasks.ALIGN, 2)["results"]] == ["align"]
    assert calls == ["align"]


def test_a_training_task_logs_a_line_per_epoch_and_the_stage_table(monkeypatch, caplog):
    from pipeline.training import launch

    epoch = {"train/loss": 0.9, "train/samples_per_s": 120.0, "train/seconds": 2.5, "improved": True,
             "val/mean_accuracy": 0.75, "val/mean_recall_at_precision": 0.5}

    def two_epochs(training, stage, processes, callbacks=()):
        for i in range(2):
            for callback in callbacks:
                callback.on_epoch_end(stage, i, epoch)
        return {"stage": stage, "run_id": "run-w", "metrics": {"mean_accuracy": 0.75}, "epochs_run": 2,
                "best_epoch": 1}

    monkeypatch.setattr(launch, "run_stage_distributed", two_epochs)
    state = {"training": {"stages": list(airflow_tasks.STAGES)}, "results": []}
    with caplog.at_level("INFO", logger=airflow_tasks.log.name):
        airflow_tasks.train_stage(state, "warmup")
    lines = [r.getMessage() for r in caplog.records if r.name == airflow_tasks.log.name]
    epochs = [line for line in lines if line.startswith("warmup epoch")]
    assert len(epochs) == 2 and epochs[1].startswith("warmup epoch 1: train/loss=0.9000")
    assert all(f in epochs[0] for f in ("mean_recall_at_precision=0.5000", "mean_accuracy=0.7500",
                                          "120.0 samples/s", "2.5 s"))
    assert "run-w" in lines[-1] and "mean_accuracy" in lines[-1]   # the summary: the stage table


def test_scoring_dag_shape(dagbag):
    from airflow.sdk import AssetOrTimeSchedule

    dag = dagbag.dags["cmaclip_nightly_scoring"]
    assert isinstance(dag.timetable, AssetOrTimeSchedule)  # nightly cron, or a new champion
    score = dag.get_task("score")
    assert score.map_index_template and score.max_active_tis_per_dagrun == airflow_tasks.SCORING_PARALLELISM
    assert [o.uri for o in dag.get_task("publish").outlets] == [airflow_tasks.PREDICTIONS_ASSET_URI]
    order = ["validate", "plan", "score", "finalize", "report", "gate", "publish"]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.get_task("validate").retries == 0
    assert airflow_tasks.MAX_SCORING_TASKS < 1024  # far below Airflow's default max_map_length
    from airflow.sdk.exceptions import ParamValidationError

    from pipeline.scoring.gate import Limits

    assert dag.params["explain"] is False  # the contribution columns only when asked for
    assert dag.params["publish_anyway"] is False  # only an explicit trigger publishes past the gate
    assert dag.params["full"] is False  # incremental: only new and changed products are scored
    assert {name: dag.params[name] for name in Limits().to_dict()} == Limits().to_dict()
    bad_values = {"explain": "yes", "publish_anyway": "yes", "full": "no", "max_psi": -0.1, "max_quarantine_rate": "high"}
    for name, bad in bad_values.items():
        with pytest.raises(ParamValidationError):
            dag.params.get_param(name).resolve(bad)


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_every_task_fails_at_once_on_an_input_mistake(dagbag, dag_id):
    """Each task function is wrapped by `airflow_tasks.fail_fast` (what it does: tests/test_validate_params.py)."""
    code = airflow_tasks.fail_fast(lambda: None, RuntimeError).__code__
    assert [t.task_id for t in dagbag.dags[dag_id].tasks
            if getattr(t, "python_callable", None) is None or t.python_callable.__code__ is not code] == []


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_every_task_says_what_it_does(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    undocumented = [t.task_id for t in dag.tasks if len((t.doc_md or "").split()) < 8]
    assert undocumented == []
    assert all(t.task_id in dag.doc_md for t in dag.tasks)   # the DAG's own doc names each of them


def test_the_embedded_airflow_is_sized_for_this_machine_and_quiet(tmp_path):
    env = airflow_home.environment(tmp_path, base={})
    # LocalExecutor forks `parallelism` workers at start: not Airflow's 32 on a 2-core machine.
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) == max(2, airflow_home.cpu_count())
    assert env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"   # progress bars show as ERROR in task logs
    chosen = airflow_home.environment(tmp_path, base={"AIRFLOW__CORE__PARALLELISM": "8"})
    assert chosen["AIRFLOW__CORE__PARALLELISM"] == "8"   # a deployment's own setting wins
    Path(env["AIRFLOW_HOME"]).mkdir()
    written = airflow_home.write_env_file(env).read_text().splitlines()   # what `airflow standalone` starts with
    assert f"AIRFLOW__CORE__PARALLELISM={env['AIRFLOW__CORE__PARALLELISM']}" in written
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false" in written
    # The API server `airflow standalone` starts loads the checkout's plugins (the trigger guard).
    assert f"AIRFLOW__CORE__PLUGINS_FOLDER={REPO_ROOT / 'plugins'}" in written


def test_shard_groups_stay_below_the_map_limit():
    ids = [f"{i:05d}" for i in range(5000)]
    groups = airflow_tasks.group_shards(ids, 64)
    assert len(groups) <= 64 and [s for g in groups for s in g["shards"]] == ids
    assert groups[0]["label"] == "shards 00000-00078"
    assert airflow_tasks.group_shards(ids[:3], 64) == [{"label": f"shard {i}", "shards": [i]} for i in ids[:3]]


# What would make a DAG file slow to parse (Airflow re-parses every file every few seconds, with a timeout):
# the project's heavy libraries, none of which the file may import at its top. Of cmaclip, only its
# torch-free config (stage names, config files).
HEAVY = ("torch", "torchvision", "open_clip", "mlflow", "pyarrow", "pandas", "numpy", "duckdb", "fsspec",
         "s3fs", "PIL", "matplotlib")
LIGHT_CMACLIP = {"cmaclip", "cmaclip.config"}
PARSE_PROBE = """
import json, runpy, sys, warnings
import airflow.sdk
from airflow.sdk import Asset, Param, dag, task  # the lazy attributes, loaded before the snapshot
before = set(sys.modules)
with warnings.catch_warnings():
    warnings.simplefilter("error")  # any warning while our DAG file runs fails the probe
    runpy.run_path(sys.argv[1])
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_without_heavy_imports_or_warnings(dag_file: Path, airflow_env):
    proc = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(dag_file)], env=airflow_env["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "pipeline" in imported  # the probe sees the file's own imports
    assert sorted({m.split(".")[0] for m in imported} & set(HEAVY)) == []
    assert {m for m in imported if m.split(".")[0] == "cmaclip"} <= LIGHT_CMACLIP


# --- end to end (slow) ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def catalog(airflow_env) -> str:
    from pipeline.synthetic import make_catalog
    uri = str(airflow_env["home"] / "catalog" / "catalog.parquet")
    make_catalog(160, uri, seed=3, with_bad_rows=True)
    return uri


@pytest.fixture(scope="module")
def airflow_db(airflow_env) -> None:
    airflow_home.prepare(airflow_env["home"])


def _states(dag_run) -> dict[tuple[str, int], tuple[str, int]]:
    return {(ti.task_id, ti.map_index): (str(ti.state), ti.try_number) for ti in dag_run.get_task_instances()}


@pytest.mark.slow
@pytest.mark.parametrize("conf, message", [
    ({"config": "nope"}, "config 'nope' is neither a config in cmaclip/configs/"),
    ({"catalog_uri": "{home}/catalog/gone.parquet"}, "no Parquet files found"),
    ({"epoch": {"warmup": 1}}, "unknown param 'epoch' (did you mean 'epochs'?)"),   # Airflow takes any key
], ids=["bad-config", "missing-catalog", "unknown-param"])
def test_a_bad_param_fails_validate_on_its_first_try_and_nothing_runs_after_it(
        dagbag, airflow_db, airflow_env, catalog, conf, message):
    conf = {k: v.format(home=airflow_env["home"]) if isinstance(v, str) else v for k, v in conf.items()}
    real_validate, raised = airflow_tasks.validate_retrain, []

    def recording(*args, **kwargs):
        try:
            return real_validate(*args, **kwargs)
        except Exception as exc:
            raised.append(exc)
            raise

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(airflow_tasks, "validate_retrain", recording)
        # Every param the cases change is given: dag.test runs tasks in this process, where a run's conf
        # stays in the DAG object's params for the next run.
        dag_run = dagbag.dags["cmaclip_retrain"].test(run_conf={"catalog_uri": catalog, "config": "tiny", **conf})
    states = _states(dag_run)
    assert dag_run.state == "failed" and states[("validate", -1)] == ("failed", 1)
    assert {state for (task_id, _), (state, _) in states.items() if task_id != "validate"} == {"upstream_failed"}
    assert len(raised) == 1 and message in str(raised[0])   # the message the task fails with (fail_fast)


class _Interrupt(Exception):
    """A simulated preemption of a worker in the middle of a stage."""


@pytest.fixture(scope="module")
def retrained(dagbag, airflow_db, catalog, airflow_env):
    """Run cmaclip_retrain once, with end_to_end interrupted after its first epoch on the first attempt."""
    from cmaclip.train import Callback
    from pipeline.training import trainer

    class StopAfterFirstEpoch(Callback):
        def on_epoch_end(self, stage, epoch, metrics):
            raise _Interrupt(f"worker lost after epoch {epoch} of {stage}")

    class RecordEpochs(Callback):
        def __init__(self):
            self.epochs = []

        def on_epoch_end(self, stage, epoch, metrics):
            self.epochs.append(epoch)

    real_run_stage, attempts, hooked = trainer.run_stage, [], {}

    def flaky_run_stage(handle, stage, epochs=None, callbacks=()):
        hooked[stage] = [type(c).__name__ for c in callbacks]
        if stage != "end_to_end":
            return real_run_stage(handle, stage, epochs, callbacks)
        recorder = RecordEpochs()
        hooks = [*callbacks, recorder] + ([StopAfterFirstEpoch()] if not attempts else [])
        attempts.append(recorder)
        return real_run_stage(handle, stage, epochs, hooks)

    # As the demo runs it: the scoring DAG paused while a test run emits the champion event it is scheduled on.
    # It starts unpaused, as the demo's environment creates it (an earlier test's in-process DagBag sync may
    # have created its row paused), so the test sees paused() put it back.
    airflow_home.run_airflow(["dags", "reserialize"], airflow_env["env"])
    airflow_home.run_airflow(["dags", "unpause", "cmaclip_nightly_scoring"], airflow_env["env"])
    with pytest.MonkeyPatch.context() as mp, airflow_home.paused("cmaclip_nightly_scoring", airflow_env["env"]):
        mp.setattr(trainer, "run_stage", flaky_run_stage)
        dag_run = dagbag.dags["cmaclip_retrain"].test(
            run_conf={"catalog_uri": catalog, "epochs": EPOCHS, "config": "tiny"})
    return {"dag_run": dag_run, "states": _states(dag_run), "attempts": [r.epochs for r in attempts],
            "callbacks": hooked}


@pytest.mark.slow
def test_retrain_dag_runs_end_to_end_and_resumes_the_interrupted_stage(retrained, airflow_env):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from pipeline import settings
    from pipeline.tracking import registry, tracker

    assert retrained["dag_run"].state == "success", retrained["states"]
    states = retrained["states"]
    for task_id in ("plan_ingest", "finish_ingest", "align", "warmup", "tuning", "evaluate", "register", "compare"):
        assert states[(task_id, -1)] == ("success", 1), (task_id, states)
    staged = [state for (task_id, _), state in states.items() if task_id == "stage_group"]
    assert staged and set(staged) == {("success", 1)}
    # The tiny config leaves align off: its task passed the training on without training anything.
    handle = json.loads(next(airflow_env["home"].rglob("training/training.json")).read_text())
    assert handle["stages"] == list(airflow_tasks.STAGES)
    assert not any(p.name == "align" for p in airflow_env["home"].rglob("stages/*"))
    # end_to_end failed once, was retried by Airflow, and the retry trained only the missing epoch.
    assert states[("end_to_end", -1)] == ("success", 2)
    assert retrained["attempts"] == [[0], [1]]
    # The first version becomes champion without a comparison, so the gate short-circuits promote...
    assert states[("promote", -1)][0] == "skipped"
    settings.configure()
    versions = registry.list_versions(airflow_tasks.MODEL_NAME)
    assert [v["aliases"] for v in versions] == [["champion"]]
    # The MLflow training run names the Airflow run that made it, and the version links to both.
    run = tracker.client().get_run(versions[0]["run_id"])
    assert run.data.tags[tracker.AIRFLOW_RUN_TAG] == retrained["dag_run"].run_id
    assert run.info.run_name.startswith("retrain ") and run.info.run_name.endswith("→ v1")
    assert retrained["dag_run"].run_id in registry.description(airflow_tasks.MODEL_NAME, "1")
    # ...and register announced the new champion on the Asset the scoring DAG listens to.
    with create_session() as session:
        events = [e for e in session.query(AssetEvent).all() if e.uri == airflow_tasks.champion_asset_uri()]
    assert [e.extra for e in events] == [{"version": "1"}]
    # Each stage logged its epochs (cmaclip.train.PrintCallback into the task log).
    assert retrained["callbacks"] == {s: ["PrintCallback"] for s in airflow_tasks.STAGES}
    # dag.test runs no scheduler, and writes every DAG of the folder to the DB: an unpaused scoring DAG would
    # have the event queued, and the first start of `airflow standalone` would run it. It was paused through
    # the run, so nothing waits, and it is unpaused again for its cron.
    from airflow.models.asset import AssetDagRunQueue
    from airflow.models.dag import DagModel

    with create_session() as session:
        scoring = session.get(DagModel, "cmaclip_nightly_scoring")
        assert scoring is not None and not scoring.is_paused
        assert session.query(AssetDagRunQueue).filter_by(target_dag_id="cmaclip_nightly_scoring").count() == 0


@pytest.mark.slow
def test_scoring_dag_runs_end_to_end_and_a_rerun_skips_committed_shards(retrained, dagbag, catalog, airflow_env):
    from pipeline.io import storage
    from pipeline.scoring import runner

    dag = dagbag.dags["cmaclip_nightly_scoring"]
    predictions = str(airflow_env["home"] / "predictions")
    conf = {"catalog_uri": catalog, "predictions_uri": predictions, "rows_per_shard": 50}
    real_score_shard, scored = runner.score_shard, []

    def broken_last_shard(shard, model, out, **kwargs):
        if shard.id == "00003":
            raise OSError("storage unavailable for shard 00003")
        return real_score_shard(shard, model, out, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # first run: one shard keeps failing, the run fails
        mp.setattr(runner, "score_shard", broken_last_shard)
        first = dag.test(run_conf=conf)
    states = _states(first)
    assert first.state == "failed"
    assert states[("score", 3)] == ("failed", 2)  # tried, retried, gave up
    assert {states[("score", i)][0] for i in range(3)} == {"success"}
    assert states[("finalize", -1)][0] == "upstream_failed"

    def recording(shard, model, out, **kwargs):
        marker = real_score_shard(shard, model, out, **kwargs)
        scored.append((shard.id, marker["skipped"]))
        return marker

    with pytest.MonkeyPatch.context() as mp:  # rerun: only the missing shard is scored
        mp.setattr(runner, "score_shard", recording)
        second = dag.test(run_conf=conf)
    assert second.state == "success", _states(second)
    assert sorted(scored) == [("00000", True), ("00001", True), ("00002", True), ("00003", False)]

    manifests = storage.list_files(storage.join(predictions, "_manifests"), ".json")
    assert len(manifests) == 1
    manifest = storage.read_json(manifests[0])
    rows = storage.parquet_file(catalog).metadata.num_rows
    assert manifest["shards"] == 4 and manifest["rows_in"] == rows
    assert manifest["predicted"] + manifest["quarantined"] == rows and manifest["quarantined"] > 0
    assert manifest["model_version"] == "1"
    assert storage.exists(storage.join(predictions, "published", "latest.parquet"))
    assert {ti.rendered_map_index for ti in second.get_task_instances() if ti.task_id == "score"} == \
        {"shard 00000", "shard 00001", "shard 00002", "shard 00003"}
    assert storage.exists(storage.join(predictions, "_reports", f"run={manifest['run_id']}", "summary.md"))

    # The next night, ten products fewer, and a limit the run exceeds: the gate fails at once (no retry),
    # naming it, and nothing is published...
    import pyarrow.parquet as pq

    from pipeline.scoring import versions

    published = storage.read_bytes(storage.join(predictions, "published", "latest.parquet"))
    smaller = str(airflow_env["home"] / "catalog" / "smaller.parquet")
    pq.write_table(pq.read_table(catalog).slice(10), smaller)
    strict = {**conf, "catalog_uri": smaller, "max_quarantine_rate": 0.0}
    blocked = _states(dag.test(run_conf=strict))
    assert blocked[("gate", -1)] == ("failed", 1) and blocked[("publish", -1)][0] == "upstream_failed"
    assert storage.read_bytes(storage.join(predictions, "published", "latest.parquet")) == published
    # ...unless a trigger says to publish anyway.
    forced = dag.test(run_conf={**strict, "publish_anyway": True})
    assert forced.state == "success" and _states(forced)[("publish", -1)][0] == "success"
    current = versions.current(predictions)
    assert (current.version, current.previous, current.forced) == (2, 1, True)
    assert current.gate_exceeded and current.gate_exceeded[0].startswith("quarantine rate")
    assert current.rows == manifest["predicted"] - 10  # the ten products left the catalog, and the state
