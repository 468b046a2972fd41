"""Score the whole catalog with the champion model: every night, and whenever a new champion is promoted.

    validate -> plan -> score (one mapped task per group of shards) -> finalize -> report -> gate -> publish

The schedule is a cron (`CMACLIP_SCORING_SCHEDULE`, default "0 2 * * *", UTC) OR an event on the champion
Asset that `cmaclip_retrain` emits, whichever comes first (AssetOrTimeSchedule). `validate` checks every
param in seconds, without retries (an unknown param name, the model reference, the catalog's files and
columns, the storage); in any task, an error retrying cannot fix fails it at once. `plan` pins the champion's
version (an alias may move mid-run; every shard must be scored by one version), cuts the catalog into shards,
finds the products whose published prediction carries over (same title, image and model: only new and changed
products are scored, unless the `full` param is on) and groups the shards so the map stays far below
Airflow's max_map_length; each mapped `score` task is labelled with its shard range. Each shard is
committed atomically with a done marker, so a retried task or a rerun of the DAG skips committed shards and
redoes the rest. `report` writes what catalog teams act on (fill,
disagreements, per-task drift against the published state) and shows its summary in the task log; `gate`
fails the run, without a retry, when a limit is exceeded, naming each one (trigger again with
`publish_anyway` to publish it nonetheless); `publish` writes the run as a new version of the published state and emits the predictions Asset.
"""
from __future__ import annotations

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline.orchestration import airflow_tasks as orch


def fail_fast(task_function):
    """An input mistake fails the task at once (AirflowFailException); crashes keep their retries."""
    return orch.fail_fast(task_function, AirflowFailException)


# What a task passes on but logs its own summary of (validate's checks, plan's groups), not shown twice.
QUIET = {"show_return_value_in_logs": False}
CHAMPION = Asset(orch.champion_asset_uri())
PREDICTIONS = Asset(orch.PREDICTIONS_ASSET_URI)

PARAMS = {
    "catalog_uri": Param(orch.default_catalog_uri(), type="string", minLength=1, title="Catalog",
                         description="Catalog Parquet: a file, folder or glob; any fsspec URI (s3://...)."),
    "model": Param(f"models:/{orch.MODEL_NAME}@champion", type="string", minLength=1, title="Model",
                   description="models:/name@alias, models:/name/<version>, runs:/<id>/model or a checkpoint folder."),
    "predictions_uri": Param(orch.default_predictions_uri(), type="string", minLength=1, title="Predictions folder"),
    "rows_per_shard": Param(10_000, type="integer", minimum=1, title="Rows per shard",
                            description="The unit of commit and of rerun; shards are grouped into mapped tasks."),
    "explain": Param(False, type="boolean", title="Explain",
                     description="Add each task's title and image contributions (3 forward passes per batch)."),
    "full": Param(False, type="boolean", title="Full rescore",
                  description="Score every product. Off: a product whose title, image and model are those of its "
                              "published prediction carries it over; only new and changed ones are scored."),
    "publish_anyway": Param(False, type="boolean", title="Publish anyway",
                            description="Publish even if the quality gate fails (set it on a manual trigger)."),
    **{name: Param(default, type="number", minimum=0, title=name, description=f"Quality gate: {meaning}.")
       for name, (default, meaning) in orch.gate_params().items()},
}


@dag(schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(orch.SCORING_SCHEDULE, timezone="UTC"),
                                  assets=CHAMPION),
     catchup=False, max_active_runs=1, params=PARAMS, tags=["cmaclip", "scoring"],
     default_args=orch.retry_policy(), doc_md=__doc__)
def cmaclip_nightly_scoring():

    @task(retries=0, **QUIET)
    @fail_fast
    def validate(params=None):
        """Check every param before anything runs: no name the DAG does not take, the model reference
        resolving in the registry (a lookup, no download), the catalog's Parquet files listed with
        product_id, title and image (or image_uri), storage within `CMACLIP_STORAGE_PREFIXES`. No retries:
        it fails in seconds, naming what to fix."""
        return orch.validate_scoring(params, known=PARAMS)

    @task(**QUIET)
    @fail_fast
    def plan(params=None, ti=None):
        """Pin the model's version, cut the catalog into shards, find the products whose published prediction
        carries over, and group the shards into mapped tasks. Returns the groups (only a return value can be
        mapped); the run (plan, pinned model, run id) goes to the XCom key "run"."""
        planned = orch.plan_scoring(params["catalog_uri"], params["model"], params["rows_per_shard"],
                                    params["predictions_uri"], explain=params["explain"], full=params["full"])
        ti.xcom_push(key="run", value=planned["run"])
        return planned["groups"]

    # Shards run on few, long-lived tasks: at most SCORING_PARALLELISM at once per run, so the nightly
    # job leaves workers (and the CPU of a small machine) to the rest. A mapped task does not take its
    # function's docstring as its doc: it is given explicitly.
    @task(map_index_template="{{ shards }}", max_active_tis_per_dagrun=orch.SCORING_PARALLELISM,
          doc_md="Score one group of shards with one model load; each mapped task is labelled with its shard "
                 "range. A committed shard is skipped, so a retry or a rerun scores only the rest.")
    @fail_fast
    def score(group: dict, run: dict, params=None):
        get_current_context()["shards"] = group["label"]
        return orch.score_group(run, group, params["predictions_uri"])

    @task
    @fail_fast
    def finalize(run: dict, scored: list[dict], params=None):
        """Check every shard of the run is committed and its rows reconcile; write the run manifest.
        (`scored` only orders it after every mapped task: the check reads the committed files.)"""
        return orch.finalize_scoring(run, params["predictions_uri"])

    @task
    @fail_fast
    def report(finalized: dict, params=None):
        """The run's report against the published state (fill, disagreements, drift); its summary in the
        log."""
        return orch.report_run(finalized, params["predictions_uri"], params["catalog_uri"])

    @task
    @fail_fast
    def gate(reported: dict, params=None):
        """The quality gate: a run over a limit fails here without a retry (a verdict, not an accident),
        naming each limit, unless `publish_anyway` is on."""
        verdict = orch.check_gate(reported, params["predictions_uri"], params)
        if not verdict["passed"] and not params["publish_anyway"]:
            raise AirflowFailException("quality gate failed, not published: " + "; ".join(verdict["exceeded"])
                                       + " (trigger again with publish_anyway to publish this run)")
        return verdict

    @task(outlets=[PREDICTIONS])
    @fail_fast
    def publish(finalized: dict, verdict: dict, params=None, outlet_events=None):
        """Publish the run as the new version of the published state (the gate applied again, forced with
        `publish_anyway`), then retention; emits the predictions Asset. (`verdict` orders it after the gate.)"""
        published = orch.publish_predictions(params["predictions_uri"], params["catalog_uri"],
                                             run_id=finalized["run_id"], limits=params,
                                             force=params["publish_anyway"])
        outlet_events[PREDICTIONS].extra = {"uri": published["latest"], "run_id": finalized["run_id"],
                                            "model_version": finalized["model_version"],
                                            "version": published["version"]}
        return published

    groups = plan()
    validate() >> groups
    scored = score.partial(run=groups["run"]).expand(group=groups)
    finalized = finalize(groups["run"], scored)
    publish(finalized, gate(report(finalized)))


cmaclip_nightly_scoring()
