"""Retrain CMA-CLIP on demand; the registry decides whether the new model becomes the champion.

    validate -> plan_ingest -> stage_group (mapped) -> finish_ingest -> align -> warmup -> end_to_end
        -> tuning -> evaluate -> register -> compare -> promote

Trigger it from the UI (the form shows the params below, validated by their JSON schema) or with
`airflow dags trigger cmaclip_retrain -c '{"epochs": {"warmup": 2}}'`. Each task is one call into
`pipeline.orchestration.airflow_tasks`; XCom carries URIs and small JSON. Everything a run writes lives under one folder
named after the run, so a retried training stage resumes after its last completed epoch, and a retried
ingest group restages only itself (the groups committed before are skipped).

`validate` checks every param in seconds, without retries: a param the DAG does not take (Airflow accepts
any key in a run's conf), the config, the catalog's files and columns, the storage. In any task, an error
retrying cannot fix (a bad config, a missing catalog, a refused URI) fails it at once; crashes and storage
errors are retried.

`align` opens the training (its MLflow parent run) and runs the optional catalog pre-training when the
config, or the `epochs` param (`{"align": 2}`), gives it epochs; otherwise it trains nothing and passes on.
Each training task logs a line per epoch and the table of the stages trained so far.

`compare` is a short-circuit: when the gate fails (or `promote` is off, or there is no champion to
compare with) `promote` shows as skipped. A new champion, promoted here or registered as the very first
version, emits the champion Asset, which schedules `cmaclip_nightly_scoring` to rescore the catalog.
"""
from __future__ import annotations

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline.orchestration import airflow_tasks as orch
from pipeline.orchestration.airflow_home import GPU_POOL

# The registered model name is a param, so the champion Asset (`cmaclip://models/<name>/champion`) is
# named at run time through an alias, and an event is attached only when a champion actually changed:
# a refused promotion (which still succeeds as a task) emits nothing.
CHAMPION_CHANGES = AssetAlias("cmaclip_champion_changes")

PARAMS = {
    "catalog_uri": Param(orch.default_catalog_uri(), type="string", minLength=1, title="Catalog",
                         description="Catalog Parquet: a file, folder or glob; any fsspec URI (s3://...)."),
    "tasks": Param(list(orch.TASKS), type="array", items={"type": "string", "pattern": r"^[A-Za-z_]\w*$"},
                   minItems=1, uniqueItems=True, title="Tasks", description="Label columns to learn, one per line."),
    "config": Param("tiny", type="string", minLength=1, title="Model config",
                    examples=orch.config_names(),
                    description="A config name in cmaclip/configs/ or the path of a config JSON file."),
    "epochs": Param({}, type="object", title="Epochs per stage",
                    properties={orch.ALIGN: {"type": "integer", "minimum": 0, "maximum": 1000},
                                **{s: {"type": "integer", "minimum": 1, "maximum": 1000} for s in orch.STAGES}},
                    additionalProperties=False,
                    description='Overrides of the config\'s epochs, e.g. {"warmup": 2, "tuning": 1}; {} keeps them. '
                                '{"align": 2} adds the catalog pre-training before warmup, {"align": 0} removes it.'),
    "target_precision": Param(0.9, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                              title="Target precision",
                              description="Thresholds are calibrated, and recall reported, at this precision."),
    "model_name": Param(orch.MODEL_NAME, type="string", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                        title="Registered model name"),
    "promote": Param(True, type="boolean", title="Promote",
                     description="Make the new version the champion when it passes the gate."),
    "training_processes": Param(1, type="integer", minimum=1, maximum=64, title="Training processes",
                                description="Processes per stage: more than 1 runs the stage under torchrun (DDP), "
                                            "e.g. one per GPU of the worker."),
    "work_uri": Param(orch.default_work_uri(), type="string", minLength=1, title="Work folder",
                      description="Root of the per-run folders: dataset and training checkpoints."),
}


def _run_folder() -> str:
    context = get_current_context()
    return orch.run_uri(context["params"]["work_uri"], context["dag"].dag_id, context["run_id"])


def _training_failed(context) -> None:
    # A training task gave up after its retries: close the MLflow parent run as FAILED, not RUNNING forever.
    orch.mark_training_failed(orch.run_uri(context["params"]["work_uri"], context["dag"].dag_id, context["run_id"]))


def fail_fast(task_function):
    """An input mistake fails the task at once (AirflowFailException); crashes keep their retries."""
    return orch.fail_fast(task_function, AirflowFailException)


# What a task passes on but logs its own summary of (validate's checks; the training state, the handle and
# every stage's metrics) is not shown again as Airflow's "Returned value was: ..." of several KB.
QUIET = {"show_return_value_in_logs": False}
TRAINING = {"pool": GPU_POOL, "queue": orch.TRAINING_QUEUE, "on_failure_callback": _training_failed, **QUIET}


@dag(schedule=None, catchup=False, max_active_runs=1, params=PARAMS, tags=["cmaclip", "training"],
     default_args=orch.retry_policy(), doc_md=__doc__)
def cmaclip_retrain():

    @task(retries=0, **QUIET)
    @fail_fast
    def validate(params=None):
        """Check every param before anything runs: no name the DAG does not take, the config found and
        loading, the catalog's Parquet files listed with every column of `tasks`, storage within
        `CMACLIP_STORAGE_PREFIXES`. No retries: it fails in seconds, naming what to fix."""
        return orch.validate_retrain(params, known=PARAMS)

    # Ingest: plan cuts the catalog into groups of row groups (its return value is what stage_group maps
    # over; the plan goes to the XCom key "plan"), each group is staged and committed by its own task, so
    # a failed group retries alone, and finish_ingest decides and writes the dataset.
    @task(**QUIET)
    @fail_fast
    def plan_ingest(params=None, ti=None):
        """Cut the catalog into groups of row groups, one mapped `stage_group` task each."""
        planned = orch.plan_ingest(params["catalog_uri"], params["tasks"], _run_folder())
        ti.xcom_push(key="plan", value=planned["plan"])
        return planned["groups"]

    @task(map_index_template="{{ group }}",
          doc_md="Read, validate, hash and convert one group's rows into staging, committed with a done marker: "
                 "a retry redoes only this group.")
    @fail_fast
    def stage_group(group: str, plan: dict):
        get_current_context()["group"] = group
        return orch.stage_ingest_group(plan, group, _run_folder())

    # `staged` orders finish after every group; it reads the committed groups themselves.
    @task
    @fail_fast
    def finish_ingest(plan: dict, staged: list[dict]):
        """Dedup, split and label vocabularies over the staged metadata, then the dataset parts, quarantine
        and manifest (last) under this run's folder."""
        return orch.finish_ingest(plan, _run_folder())

    @task(**TRAINING)
    @fail_fast
    def align(dataset: dict, params=None, dag=None, run_id=None):
        """Open the training (its MLflow parent run), then the optional catalog pre-training of CLIP: only
        when the config or the `epochs` param gives `align` epochs, else it passes on."""
        state = orch.open_training(dataset, _run_folder(), params["config"], epochs=params["epochs"],
                                   target_precision=params["target_precision"], model_name=params["model_name"],
                                   dag_id=dag.dag_id, run_id=run_id)
        return orch.train_stage(state, orch.ALIGN, params["training_processes"])

    @task(**TRAINING)
    @fail_fast
    def warmup(state: dict, params=None):
        """Algorithm 1, stage 1: CLIP frozen; the sequence and modality attention and the heads train.
        Resumes after its last completed epoch."""
        return orch.train_stage(state, "warmup", params["training_processes"])

    @task(**TRAINING)
    @fail_fast
    def end_to_end(state: dict, params=None):
        """Algorithm 1, stage 2: everything trains, from warmup's best checkpoint. Resumes after its last
        completed epoch."""
        return orch.train_stage(state, "end_to_end", params["training_processes"])

    @task(**TRAINING)
    @fail_fast
    def tuning(state: dict, params=None):
        """Algorithm 1, stage 3: CLIP and the sequence attention frozen; the modality attention and the heads
        train. Resumes after its last completed epoch."""
        return orch.train_stage(state, "tuning", params["training_processes"])

    @task(on_failure_callback=_training_failed, **QUIET)
    @fail_fast
    def evaluate(state: dict):
        """Log the last stage's best checkpoint as the training's MLflow model, with each stage's validation
        metrics, and close the training run."""
        return orch.evaluate(state)

    @task(outlets=[CHAMPION_CHANGES])
    @fail_fast
    def register(evaluated: dict, outlet_events=None):
        """A new version in the MLflow registry; the very first version becomes champion at once (and emits
        the champion Asset)."""
        registered = orch.register(evaluated)
        if registered["new_champion"]:
            outlet_events[CHAMPION_CHANGES].add(Asset(orch.champion_asset_uri(registered["name"])),
                                                extra={"version": registered["version"]})
        return registered

    @task.short_circuit
    @fail_fast
    def compare(registered: dict, params=None, ti=None) -> bool:
        """Champion against the new version on the dataset's test split, through the registry's gate; the
        table in the log. `promote` is skipped unless the gate passes and the `promote` param is on."""
        decision = orch.compare(registered)
        ti.xcom_push(key="decision", value=decision)
        return decision["passed"] and params["promote"]

    @task(outlets=[CHAMPION_CHANGES])
    @fail_fast
    def promote(registered: dict, decision: dict, outlet_events=None):
        """Move the `champion` alias to the new version (the gate checked again) and emit the champion Asset,
        which starts `cmaclip_nightly_scoring`."""
        promoted = orch.promote(registered, decision)
        if promoted["promoted"]:
            outlet_events[CHAMPION_CHANGES].add(Asset(orch.champion_asset_uri(promoted["name"])),
                                                extra={"version": promoted["challenger"]})
        return promoted

    groups = plan_ingest()
    validate() >> groups
    dataset = finish_ingest(groups["plan"], stage_group.partial(plan=groups["plan"]).expand(group=groups))
    registered = register(evaluate(tuning(end_to_end(warmup(align(dataset))))))
    gate = compare(registered)
    gate >> promote(registered, gate["decision"])


cmaclip_retrain()
