"""The model registry: register a finished training, compare champion and challenger, promote by gate.

Aliases carry the roles: every new version becomes `challenger`, except the very first, which becomes
`champion` directly. `compare` scores both on the same frozen test split (the ingested dataset's `test`
split) and records the result three ways: a run in the evaluation experiment, tags on both versions, and
a printed table. `promote` moves `champion` only when the gate passes, or when forced; a tag on the
version says why, either way.

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
from . import tracker

DEFAULT_NAME = "cmaclip"
CHAMPION, CHALLENGER = "champion", "challenger"
EVALUATION_EXPERIMENT = "cmaclip-evaluation"
GATE_METRICS = ("accuracy", "recall_at_precision")
TAG = "cmaclip."


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
    `challenger`. Returns {"name", "version", "alias", "run_id"}."""
    import mlflow

    c = tracker.client()
    found = c.search_model_versions(tracker.search_filter({"name": name, "run_id": training_run_id}))
    existing = [v for v in found if v.name == name]
    if existing:
        version = existing[0]
    else:
        run = c.get_run(training_run_id)
        tags = {f"{TAG}training_run": training_run_id,
                f"{TAG}dataset.fingerprint": run.data.params.get("dataset.fingerprint", ""),
                f"{TAG}dataset.uri": run.data.params.get("dataset.uri", ""),
                f"{TAG}code.version": run.data.params.get("code.version", "")}
        from .pyfunc import logged_model_uri
        source = model_uri or logged_model_uri(training_run_id)
        if source is None:
            raise ValueError(f"run {training_run_id} has no logged cmaclip model; finish the training first")
        version = mlflow.register_model(source, name, tags=tags)
    alias = _first_alias(c, name, version.version)
    return {"name": name, "version": str(version.version), "alias": alias, "run_id": training_run_id}


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
        c.set_model_version_tag(name, version, f"{TAG}promotion", "first version: champion without a comparison")
        return CHAMPION
    c.set_registered_model_alias(name, CHALLENGER, version)
    return CHALLENGER


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


def _model_version(c, ref: str) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return name, str(c.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
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


def compare(name: str, dataset_uri: str, *, champion: str = CHAMPION,
            challenger: str = CHALLENGER, tolerance: float = 0.01, batch_size: int = 64,
            experiment: str = EVALUATION_EXPERIMENT) -> Comparison:
    """Evaluate the two aliased versions on the dataset's test split; record and return the comparison
    (with the gate's verdict at `tolerance`, which `promote` re-checks)."""
    from cmaclip.checkpoint import load_checkpoint
    from cmaclip.evaluate import evaluate

    from ..training.data import split_batches

    c = tracker.client()
    versions = {role: _model_version(c, f"{name}@{alias}")[1] for role, alias in
                ((CHAMPION, champion), (CHALLENGER, challenger))}
    if versions[CHAMPION] == versions[CHALLENGER]:
        raise ValueError(f"{name}: {champion} and {challenger} are the same version {versions[CHAMPION]}")
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
    """An evaluation run (params, metrics, the table) and tags on both versions pointing at it."""
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
    c.set_terminated(run_id)
    for role, version in ((CHAMPION, comparison.champion), (CHALLENGER, comparison.challenger)):
        other = comparison.challenger if role == CHAMPION else comparison.champion
        for key, value in {"comparison_run": run_id, "compared_with": other, "compared_as": role,
                           "test.mean_accuracy": _mean(comparison.metrics[role], "accuracy"),
                           "test.mean_recall_at_precision": _mean(comparison.metrics[role], "recall_at_precision"),
                           }.items():
            c.set_model_version_tag(comparison.name, version, f"{TAG}{key}", str(value))
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
    """Move `champion` to the compared challenger if the gate passes at `tolerance` (or `force`). Refuses
    a stale comparison: one whose champion is no longer the champion. Returns the decision."""
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
        _move_champion(c, name, comparison.challenger, current, reason, comparison.run_id)
        return _decision(True, reason, name, comparison, verdict)
    else:
        reason = "refused: " + "; ".join(verdict["failures"])
    c.set_model_version_tag(name, comparison.challenger, f"{TAG}promotion", reason)
    return _decision(False, reason, name, comparison, verdict)


def _move_champion(c, name: str, version: str, previous: str | None, reason: str, comparison_run: str) -> None:
    c.set_registered_model_alias(name, CHAMPION, version)
    if _aliases(c, name).get(CHALLENGER) == str(version):
        c.delete_registered_model_alias(name, CHALLENGER)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in {"promotion": reason, "promoted_at": stamp, "replaced": previous or "",
                       "promotion_comparison_run": comparison_run}.items():
        c.set_model_version_tag(name, version, f"{TAG}{key}", value)
    if previous:
        c.set_model_version_tag(name, previous, f"{TAG}replaced_by", version)


def _decision(promoted: bool, reason: str, name: str, comparison: Comparison, verdict: dict) -> dict[str, Any]:
    return {"promoted": promoted, "reason": reason, "name": name, "champion_before": comparison.champion,
            "challenger": comparison.challenger, "gate": verdict}


# --- listing and tables ------------------------------------------------------------------------------

def list_versions(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Every version, newest first: version, aliases, run, creation time and the `cmaclip.*` tags."""
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


def format_versions(rows: list[dict[str, Any]]) -> str:
    header = ["version", "aliases", "created", "run_id", "test mean acc", "promotion"]
    body = [[r["version"], ",".join(r["aliases"]) or "-", r["created"], r["run_id"] or "-",
             r["tags"].get(f"{TAG}test.mean_accuracy", "-"), r["tags"].get(f"{TAG}promotion", "-")] for r in rows]
    # Every cell is a string as MLflow stores it (ids, tag values): shown as stored, never re-read as numbers.
    return tabulate(body, header, disable_numparse=True)


def format_comparison(comparison: Comparison) -> str:
    champ, chall = comparison.metrics[CHAMPION], comparison.metrics[CHALLENGER]
    header = ["task", f"acc v{comparison.champion}", f"acc v{comparison.challenger}",
              f"R@P v{comparison.champion}", f"R@P v{comparison.challenger}", "agreement"]
    body = [[t, champ[t]["accuracy"], chall[t]["accuracy"], champ[t]["recall_at_precision"],
             chall[t]["recall_at_precision"], comparison.agreement.get(t, float("nan"))] for t in champ]
    body.append(["mean", _mean(champ, "accuracy"), _mean(chall, "accuracy"), _mean(champ, "recall_at_precision"),
                 _mean(chall, "recall_at_precision"),
                 np.mean(list(comparison.agreement.values())) if comparison.agreement else float("nan")])
    verdict = comparison.gate
    lines = [f"{comparison.name}: champion v{comparison.champion} vs challenger v{comparison.challenger} "
             f"on {comparison.n} test products of {comparison.dataset_uri} (R@P = recall at the target precision)",
             tabulate(body, header, floatfmt=".4f", disable_numparse=[0])]  # a task name stays a name
    if verdict:
        lines.append(f"gate (tolerance {verdict['tolerance']}): "
                     + ("passes" if verdict["passed"] else "fails: " + "; ".join(verdict["failures"])))
    return "\n".join(lines)
