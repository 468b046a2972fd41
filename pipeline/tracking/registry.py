"""The model registry: register a finished training, compare champion and challenger, promote by gate,
roll back.

Aliases carry the roles: every new version becomes `challenger`, except the very first, which becomes
`champion` directly. `compare` scores both on the same frozen test split (by default the challenger's own
dataset's `test` split) and records the result three ways: a run in the evaluation experiment, the
challenger's tags and description, and a printed table. `promote` moves `champion` only when the gate
passes, or when forced, and the champion it replaces becomes `previous_champion`; `rollback` makes
`previous_champion` the champion again and clears that alias (one step back, not a stack: a second
rollback has nowhere recorded to go).

Every version explains itself: the tag `cmaclip.verdict` (`pending: ...`, `promoted: <how>` or
`refused: <why>`) whether it passed or not, and a Markdown description (`descriptions`): the verdict, the
comparison table against the champion, links to the training run, the comparison run and the Airflow run
that made it (`links`), and its dated history. Few tags, so MLflow's versions table shows them whole:
verdict, test.mean_accuracy, comparison_run, and rolled_back on a version rolled back from.

The gate, per task and per gate metric (accuracy and recall at the target precision): the challenger may
not be worse than the champion by more than `tolerance`; and the mean improvement over all tasks and
gate metrics must be positive. Recall at 90% precision alone is often 0 for both models on small data,
which is why accuracy is in the gate too.
"""
from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tabulate import tabulate

from .. import settings
from . import descriptions, links, tracker

DEFAULT_NAME = "cmaclip"
CHAMPION, CHALLENGER, PREVIOUS_CHAMPION = "champion", "challenger", "previous_champion"
EVALUATION_EXPERIMENT = "cmaclip-evaluation"
GATE_METRICS = ("accuracy", "recall_at_precision")
TAG = "cmaclip."
VERDICT = f"{TAG}verdict"
MAX_TAG_VALUE = 500  # the rest of a long verdict is in the description
FIRST_VERSION = "promoted: first version, champion without a comparison"
NOT_COMPARED = "pending: not compared with the champion yet"
PASSED_NOT_PROMOTED = "pending: passed the gate, not promoted yet (registry promote --comparison <run>)"


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local: the checkpoint folder and the lineage of the predictions it makes."""
    checkpoint: Path
    name: str
    version: str
    run_id: str
    uri: str


# --- register ----------------------------------------------------------------------------------------

def register(training_run_id: str, name: str = DEFAULT_NAME, model_uri: str | None = None) -> dict[str, Any]:
    """Register the pyfunc model of a finished training as a new version of `name`. Idempotent: a retry
    finds the version already made from this run. Alias: `champion` if the model has none yet, else
    `challenger`. The version gets its verdict and description, the training run its version in its
    name (`retrain 2026-12-01 11:34 → v3`). Returns {"name", "version", "alias", "run_id"}."""
    import mlflow

    c = tracker.client()
    found = c.search_model_versions(tracker.search_filter({"name": name, "run_id": training_run_id}))
    existing = [v for v in found if v.name == name]
    if existing:
        version = existing[0]
    else:
        from .pyfunc import logged_model_uri
        source = model_uri or logged_model_uri(training_run_id)
        if source is None:
            raise ValueError(f"run {training_run_id} has no logged cmaclip model; finish the training first")
        version = mlflow.register_model(source, name)
    number = str(version.version)
    alias = _first_alias(c, name, number)
    if not version.description:  # a new version, or a retry whose first attempt stopped before this
        tracker.name_registered(c, training_run_id, number)
        _describe(c, name, number, FIRST_VERSION if alias == CHAMPION else NOT_COMPARED,
                  {descriptions.LINEAGE: _lineage(c, training_run_id)}, f"registered as {alias}")
    return {"name": name, "version": number, "alias": alias, "run_id": training_run_id}


def _aliases(c, name: str) -> dict[str, str]:
    """alias -> version number, as strings (the client returns the numbers as int or str by store)."""
    from mlflow.exceptions import MlflowException

    try:
        model = c.get_registered_model(name)
    except MlflowException as exc:
        raise ValueError(f"no registered model {name!r} at {settings.tracking_uri()}") from exc
    return {alias: str(version) for alias, version in model.aliases.items()}


def _first_alias(c, name: str, version: str) -> str:
    """The alias a new version gets; the first version ever becomes champion without a comparison. A
    version that already holds a role (a retried registration) keeps it."""
    current = _aliases(c, name)
    for alias in (CHAMPION, CHALLENGER):
        if current.get(alias) == str(version):
            return alias
    if CHAMPION not in current:
        c.set_registered_model_alias(name, CHAMPION, version)
        return CHAMPION
    c.set_registered_model_alias(name, CHALLENGER, version)
    return CHALLENGER


# --- what a version says about itself ----------------------------------------------------------------

def _describe(c, name: str, version: str, verdict: str | None = None, sections: dict[str, str] | None = None,
              event: str | None = None) -> None:
    """Set the verdict tag (when given) and update the description: the verdict section, `sections`, and
    `event` appended to the history."""
    sections = dict(sections or {})
    if verdict is not None:
        c.set_model_version_tag(name, version, VERDICT, _short(verdict))
        sections[descriptions.VERDICT] = descriptions.verdict_section(verdict)
    current = c.get_model_version(name, version).description
    c.update_model_version(name, version, descriptions.update(current, sections, event))


def _short(text: str) -> str:
    return text if len(text) <= MAX_TAG_VALUE else text[:MAX_TAG_VALUE - 1] + "…"


def _lineage(c, run_id: str) -> str:
    """The training run, its dataset and code, and the Airflow run that made it (when one did)."""
    run = c.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    lines = [f"- Training run: {links.mlflow_run(run_id, run.info.experiment_id, run.info.run_name)}",
             f"- Dataset: `{params.get('dataset.uri', '?')}` (fingerprint `{params.get('dataset.fingerprint', '?')}`)",
             f"- Code: `{params.get('code.version', '?')}`, config `{params.get('config.name', '?')}`"]
    dag_id, dag_run = tags.get(tracker.AIRFLOW_DAG_TAG), tags.get(tracker.AIRFLOW_RUN_TAG, "")
    if dag_id:
        lines.append(f"- Airflow run: {links.airflow_run(dag_id, dag_run)}")
    return "\n".join(lines)


def description(name: str, version: str) -> str:
    """A version's Markdown description, as the registry keeps it."""
    return tracker.client().get_model_version(name, version).description or ""


# --- resolve -----------------------------------------------------------------------------------------

def resolve_checkpoint(model_uri: str, cache_dir: str | Path | None = None) -> ResolvedModel:
    """`models:/name@alias`, `models:/name/version` or `runs:/<run_id>/<path>` -> the checkpoint folder
    inside the logged pyfunc model, downloaded once into `<home>/cache/models/`. The cache key names the
    tracking server and the version's source, which never change for a version, so the cache never goes
    stale; an alias is looked up on every call."""
    c = tracker.client()
    if model_uri.startswith("models:/"):
        name, version = _model_version(c, model_uri.removeprefix("models:/"))
        mv = c.get_model_version(name, version)
        source, key, run_id = f"models:/{name}/{version}", f"{name}/v{version}", mv.run_id or ""
        origin = mv.source
    elif model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        name, version, source, key, origin = "", "", model_uri, f"runs/{run_id}", model_uri
    else:
        raise ValueError(f"model URI {model_uri!r}: expected models:/name@alias, models:/name/version or runs:/...")
    digest = hashlib.sha256(f"{settings.tracking_uri()}|{origin}".encode()).hexdigest()[:12]
    folder = _download(source, Path(cache_dir or settings.home() / "cache" / "models") / f"{key}-{digest}")
    checkpoint = folder / _checkpoint_path(folder)
    if not name:
        from ..scoring.predictor import checkpoint_version
        name = _pyfunc_config(folder).get("config", {}).get("model_name") or DEFAULT_NAME
        version = checkpoint_version(checkpoint)
    return ResolvedModel(checkpoint, name, str(version), run_id, model_uri)


NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _model_version(c, ref: str) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return name, str(c.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if exc.error_code not in NOT_FOUND:  # a registry outage is worth a retry; a missing alias is not
                raise
            raise ValueError(f"registered model {name!r} has no version with alias {alias!r}") from exc
    name, _, version = ref.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"models:/{ref}: expected models:/name@alias or models:/name/<version number>")
    return name, version


def _download(source: str, target: Path) -> Path:
    """Download into a temporary sibling, then rename: a reader never sees a half-downloaded model."""
    import mlflow

    if (target / "MLmodel").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp)))
        try:
            local.rename(target)
        except OSError:  # another process finished the same download first
            if not (target / "MLmodel").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _pyfunc_config(folder: Path) -> dict[str, Any]:
    from mlflow.models import Model
    return Model.load(str(folder / "MLmodel")).flavors["python_function"]


def _checkpoint_path(folder: Path) -> str:
    from .pyfunc import ARTIFACT
    return _pyfunc_config(folder)["artifacts"][ARTIFACT]["path"]


def load_predictor(model_uri: str, **kwargs):
    """A `pipeline.scoring.predictor.Predictor` for a registry or run URI, with registry lineage."""
    from ..scoring.predictor import Predictor

    resolved = resolve_checkpoint(model_uri)
    return Predictor.from_checkpoint(resolved.checkpoint, name=resolved.name, version=resolved.version, **kwargs)


# --- compare -----------------------------------------------------------------------------------------

@dataclass
class Comparison:
    """Champion vs challenger on one test split; JSON-serialisable (`as_dict`) for Airflow's XCom."""
    name: str
    dataset_uri: str
    champion: str                            # version numbers
    challenger: str
    metrics: dict[str, dict[str, dict[str, float]]]  # role -> task -> metric -> value
    agreement: dict[str, float]              # task -> share of test products with the same top-1 class
    n: int
    run_id: str = ""
    table: str = ""
    gate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Comparison":
        return cls(**d)


def compare(name: str, dataset_uri: str | None = None, *, champion: str = CHAMPION,
            challenger: str = CHALLENGER, tolerance: float = 0.01, batch_size: int = 64,
            experiment: str = EVALUATION_EXPERIMENT) -> Comparison:
    """Evaluate the two aliased versions on the test split of `dataset_uri` (default: the dataset the
    challenger was trained on); record and return the comparison (with the gate's verdict at `tolerance`,
    which `promote` re-checks)."""
    from cmaclip.checkpoint import load_checkpoint
    from cmaclip.evaluate import evaluate

    from ..training.data import split_batches

    c = tracker.client()
    versions = {role: _model_version(c, f"{name}@{alias}")[1] for role, alias in
                ((CHAMPION, champion), (CHALLENGER, challenger))}
    if versions[CHAMPION] == versions[CHALLENGER]:
        raise ValueError(f"{name}: {champion} and {challenger} are the same version {versions[CHAMPION]}")
    dataset_uri = dataset_uri or training_dataset(name, versions[CHALLENGER])
    metrics, top1, n = {}, {}, 0
    for role, version in versions.items():
        model, ckpt = load_checkpoint(resolve_checkpoint(f"models:/{name}/{version}").checkpoint)
        batches = split_batches(dataset_uri, "test", ckpt.config, batch_size)
        flat, preds = evaluate(model, batches, ckpt.config.train.target_precision, precision="fp32")
        metrics[role] = _per_task(flat, model.tasks)
        top1[role] = {t: preds.probs[t].argmax(axis=1) for t in model.tasks}
        n = len(preds)
    agreement = {t: float(np.mean(top1[CHAMPION][t] == top1[CHALLENGER][t])) if n else 0.0
                 for t in top1[CHAMPION] if t in top1[CHALLENGER]}
    comparison = Comparison(name, dataset_uri, versions[CHAMPION], versions[CHALLENGER], metrics, agreement, n)
    comparison.gate = gate(comparison, tolerance)
    comparison.table = format_comparison(comparison)
    comparison.run_id = _record(c, comparison, experiment)
    return comparison


def training_dataset(name: str, version: str) -> str:
    """The dataset URI a version was trained on, from its training run's params."""
    c = tracker.client()
    run_id = c.get_model_version(name, version).run_id
    uri = c.get_run(run_id).data.params.get("dataset.uri") if run_id else None
    if not uri:
        raise ValueError(f"{name} v{version}: its training run records no dataset (param dataset.uri); "
                         "name the dataset to compare on")
    return uri


def load_comparison(run_id: str) -> Comparison:
    """A recorded comparison back from its evaluation run (for `promote` in another process)."""
    import mlflow

    data = mlflow.artifacts.load_dict(f"runs:/{run_id}/comparison.json")
    comparison = Comparison.from_dict(data)
    comparison.table = format_comparison(comparison)
    return comparison


def _per_task(flat: dict[str, float], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    keys = ("accuracy", "macro_f1", "recall_at_precision", "image_weight", "n")
    return {t: {k: float(flat[f"{t}/{k}"]) for k in keys if f"{t}/{k}" in flat} for t in tasks}


def _record(c, comparison: Comparison, experiment: str) -> str:
    """An evaluation run (params, metrics, the table, a Markdown note), and the challenger's verdict, tags
    and description pointing at it."""
    run = c.create_run(settings.experiment_id(experiment),
                       run_name=f"{comparison.name} v{comparison.challenger} vs v{comparison.champion}",
                       tags={tracker.KIND_TAG: "comparison"})
    run_id = run.info.run_id
    tracker.log_params(c, run_id, {"model": comparison.name, "champion_version": comparison.champion,
                                   "challenger_version": comparison.challenger,
                                   "dataset.uri": comparison.dataset_uri, "split": "test", "n": str(comparison.n)})
    values = {f"{role}/{t}/{k}": v for role, tasks in comparison.metrics.items()
              for t, m in tasks.items() for k, v in m.items()}
    values.update({f"agreement/{t}": v for t, v in comparison.agreement.items()})
    values["gate/passed"] = float(comparison.gate["passed"])
    tracker.log_metrics(c, run_id, values, step=0)
    c.log_text(run_id, comparison.table, "comparison.txt")
    c.log_dict(run_id, {k: v for k, v in comparison.as_dict().items() if k != "table"}, "comparison.json")
    c.set_tag(run_id, "mlflow.note.content", format_comparison(comparison, markdown=True))
    c.set_terminated(run_id)
    version = comparison.challenger
    c.set_model_version_tag(comparison.name, version, f"{TAG}comparison_run", run_id)
    c.set_model_version_tag(comparison.name, version, f"{TAG}test.mean_accuracy",
                            str(_mean(comparison.metrics[CHALLENGER], "accuracy")))
    passed = comparison.gate["passed"]
    verdict = PASSED_NOT_PROMOTED if passed else "refused: " + "; ".join(comparison.gate["failures"])
    section = (f"{format_comparison(comparison, markdown=True)}\n\n"
               f"Comparison run: {links.mlflow_run(run_id, run.info.experiment_id)}")
    _describe(c, comparison.name, version, verdict, {descriptions.COMPARISON: section},
              f"compared with champion v{comparison.champion}: the gate {'passes' if passed else 'fails'}")
    return run_id


def _mean(per_task: dict[str, dict[str, float]], metric: str) -> float:
    values = [m[metric] for m in per_task.values() if metric in m]
    return round(float(np.mean(values)), 6) if values else float("nan")


# --- the gate and promotion --------------------------------------------------------------------------

def gate(comparison: Comparison, tolerance: float = 0.01, metrics: Sequence[str] = GATE_METRICS) -> dict[str, Any]:
    """{"passed", "failures": [...], "mean_delta", "tolerance"}: see the module docstring for the rule."""
    champion, challenger = comparison.metrics[CHAMPION], comparison.metrics[CHALLENGER]
    failures, deltas = [], []
    for task in champion:
        for metric in metrics:
            old, new = champion[task][metric], challenger.get(task, {}).get(metric, float("nan"))
            deltas.append(new - old)
            if not new >= old - tolerance:
                failures.append(f"{task} {metric} {new:.4f} < champion {old:.4f} - {tolerance}")
    mean_delta = float(np.mean(deltas)) if deltas else 0.0
    if not mean_delta > 0:
        failures.append(f"mean change over tasks and {'/'.join(metrics)} is {mean_delta:+.4f}, not better")
    return {"passed": not failures, "failures": failures, "mean_delta": mean_delta, "tolerance": tolerance}


def promote(name: str, comparison: Comparison | dict[str, Any], tolerance: float = 0.01,
            force: bool = False) -> dict[str, Any]:
    """Move `champion` to the compared challenger if the gate passes at `tolerance` (or `force`); the
    champion it replaces becomes `previous_champion`. Refuses a stale comparison: one whose champion is no
    longer the champion. Either way the challenger's verdict and description say why. Returns the decision."""
    if isinstance(comparison, dict):
        comparison = Comparison.from_dict(comparison)
    c = tracker.client()
    current = _aliases(c, name).get(CHAMPION)
    verdict = gate(comparison, tolerance)
    stale = current != comparison.champion
    if stale and not force:
        reason = f"refused: the comparison was against v{comparison.champion}, the champion is now v{current}"
    elif verdict["passed"] or force:
        reason = ("forced" + ("" if verdict["passed"] else f" despite: {'; '.join(verdict['failures'])}")
                  if force else f"gate passed: mean change {verdict['mean_delta']:+.4f}, tolerance {tolerance}")
        _move_champion(c, name, comparison.challenger, current, reason)
        return _decision(True, reason, name, comparison, verdict)
    else:
        reason = "refused: " + "; ".join(verdict["failures"])
    _describe(c, name, comparison.challenger, reason, event=f"not promoted: {reason.removeprefix('refused: ')}")
    return _decision(False, reason, name, comparison, verdict)


def _move_champion(c, name: str, version: str, previous: str | None, reason: str) -> None:
    c.set_registered_model_alias(name, CHAMPION, version)
    aliases = _aliases(c, name)
    if aliases.get(CHALLENGER) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)
    if previous and previous != str(version):
        c.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
        _describe(c, name, previous, event=f"replaced as champion by v{version}, now {PREVIOUS_CHAMPION}")
    elif aliases.get(PREVIOUS_CHAMPION) == str(version):
        c.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    replacing = f", replacing v{previous}" if previous and previous != str(version) else ""
    _describe(c, name, version, f"promoted: {reason}", event=f"promoted to champion{replacing}: {reason}")


def rollback(name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Make `previous_champion` the champion again and clear that alias: an undo of the last promotion,
    one step deep (a second rollback refuses; promote sets the alias again). The version rolled back from
    gets the tag `rolled_back`; both versions' histories say what happened. Returns {"name", "champion",
    "rolled_back_from"}."""
    c = tracker.client()
    aliases = _aliases(c, name)
    previous, current = aliases.get(PREVIOUS_CHAMPION), aliases.get(CHAMPION)
    if previous is None:
        raise ValueError(f"{name} has no {PREVIOUS_CHAMPION} to roll back to: promoting a challenger sets it, "
                         "a rollback clears it")
    c.set_registered_model_alias(name, CHAMPION, previous)
    c.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    if current and current != previous:  # else a retry after the aliases had already moved
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        c.set_model_version_tag(name, current, f"{TAG}rolled_back", f"{stamp}: champion returned to v{previous}")
        _describe(c, name, current, event=f"rolled back: v{previous} is the champion again")
        _describe(c, name, previous, event=f"champion again: rolled back from v{current}")
    return {"name": name, "champion": previous, "rolled_back_from": current}


def _decision(promoted: bool, reason: str, name: str, comparison: Comparison, verdict: dict) -> dict[str, Any]:
    return {"promoted": promoted, "reason": reason, "name": name, "champion_before": comparison.champion,
            "challenger": comparison.challenger, "gate": verdict}


# --- listing and tables ------------------------------------------------------------------------------

def list_versions(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Every version, newest first: version, aliases, run, creation time and the `cmaclip.*` tags. Two
    store calls whatever the number of versions (the model for its aliases, one search for the versions)."""
    c = tracker.client()
    aliases: dict[str, list[str]] = {}
    for alias, version in _aliases(c, name).items():
        aliases.setdefault(version, []).append(alias)
    rows = []
    found = c.search_model_versions(tracker.search_filter({"name": name}))
    for mv in sorted((v for v in found if v.name == name), key=lambda v: -int(v.version)):
        rows.append({"version": str(mv.version), "aliases": sorted(aliases.get(str(mv.version), [])),
                     "run_id": mv.run_id, "status": mv.status,
                     "created": time.strftime("%Y-%m-%d %H:%M", time.gmtime(mv.creation_timestamp / 1000)),
                     "tags": {k: v for k, v in mv.tags.items() if k.startswith(TAG)}})
    return rows


def format_versions(rows: list[dict[str, Any]], width: int = 72) -> str:
    header = ["version", "aliases", "created", "run_id", "test mean acc", "verdict"]
    body = [[r["version"], ",".join(r["aliases"]) or "-", r["created"], r["run_id"] or "-",
             r["tags"].get(f"{TAG}test.mean_accuracy", "-"), _cut(r["tags"].get(VERDICT, "-"), width)]
            for r in rows]
    # Every cell is a string as MLflow stores it (ids, tag values): shown as stored, never re-read as numbers.
    return tabulate(body, header, disable_numparse=True)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def format_comparison(comparison: Comparison, markdown: bool = False) -> str:
    """The comparison as a plain-text table, or as Markdown (a version's description, the run's note)."""
    champ, chall = comparison.metrics[CHAMPION], comparison.metrics[CHALLENGER]
    header = ["task", f"acc v{comparison.champion}", f"acc v{comparison.challenger}",
              f"R@P v{comparison.champion}", f"R@P v{comparison.challenger}", "agreement"]
    body = [[t, champ[t]["accuracy"], chall[t]["accuracy"], champ[t]["recall_at_precision"],
             chall[t]["recall_at_precision"], comparison.agreement.get(t, float("nan"))] for t in champ]
    body.append(["mean", _mean(champ, "accuracy"), _mean(chall, "accuracy"), _mean(champ, "recall_at_precision"),
                 _mean(chall, "recall_at_precision"),
                 np.mean(list(comparison.agreement.values())) if comparison.agreement else float("nan")])
    verdict = comparison.gate
    quote = "`" if markdown else ""
    lines = [f"{comparison.name}: champion v{comparison.champion} vs challenger v{comparison.challenger} "
             f"on {comparison.n} test products of {quote}{comparison.dataset_uri}{quote} "
             "(R@P = recall at the target precision)",
             tabulate(body, header, floatfmt=".4f", disable_numparse=[0],  # a task name stays a name
                      tablefmt="github" if markdown else "simple")]
    if verdict:
        lines.append(f"gate (tolerance {verdict['tolerance']}): "
                     + ("passes" if verdict["passed"] else "fails: " + "; ".join(verdict["failures"])))
    return ("\n\n" if markdown else "\n").join(lines)
