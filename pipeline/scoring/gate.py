"""The quality gate between a finalized run and its publish: limits on drift, abstention and quarantine,
checked against the run's report and manifest. A run over a limit is not published unless forced
(`cmaclip publish --force`, the nightly DAG's `publish_anyway`).

Import-light (no pyarrow, no fsspec): the DAG file reads the defaults of `Limits` for its params.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from ..manifests import RunManifest, RunReport, TaskReport


def _limit(default: float, meaning: str) -> Any:
    return dataclasses.field(default=default, metadata={"meaning": meaning})


@dataclass(frozen=True)
class Limits:
    """What a run may reach and still be published. Rates are shares in [0, 1]."""
    max_psi: float = _limit(0.25, "per task: population stability index of the published values (each class, "
                                  "and abstention) against the published state (above 0.25: a major shift)")
    max_abstention_rate: float = _limit(1.0, "per task: share of products below the task's threshold (1: no "
                                             "limit; calibrated thresholds decide it, and a jump shows in the PSI)")
    max_quarantine_rate: float = _limit(0.1, "share of the run's input rows quarantined")
    max_changed_rate: float = _limit(1.0, "per task: share of rescored products whose label changed against "
                                          "the published state (1: no limit; a new model version may rightly "
                                          "change many)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not 0 <= getattr(self, f.name):
                raise ValueError(f"gate limit {f.name} must be >= 0, got {getattr(self, f.name)}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Limits":
        """The limits named in `values` (DAG params, CLI flags; None: the default), the rest default."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in values.items() if k in names and v is not None})

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def meanings(cls) -> dict[str, str]:
        """Each limit's meaning, for the CLI's help and the DAG's trigger form."""
        return {f.name: f.metadata["meaning"] for f in dataclasses.fields(cls)}


@dataclass(frozen=True)
class Verdict:
    passed: bool
    exceeded: list[str]          # one line per limit exceeded: what, how much, the limit

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GateFailed(ValueError):
    """A run over a limit, not published."""

    def __init__(self, verdict: Verdict):
        super().__init__("the quality gate failed, not published: " + "; ".join(verdict.exceeded)
                         + " (publish anyway: `cmaclip publish --force`, or the DAG param publish_anyway)")
        self.verdict = verdict


def check(report: "RunReport", manifest: "RunManifest", limits: Limits) -> Verdict:
    """Every limit the run exceeds; it passes when there is none. Drift is checked only against a
    previous state (a first publish has none)."""
    exceeded = []
    rate = manifest.quarantined / manifest.rows_in if manifest.rows_in else 0.0
    if rate > limits.max_quarantine_rate:
        exceeded.append(f"quarantine rate {rate:.3f} > {limits.max_quarantine_rate:g} "
                        f"({manifest.quarantined} of {manifest.rows_in} rows)")
    for task in report.tasks:
        exceeded += _task_exceeded(task, limits)
    return Verdict(passed=not exceeded, exceeded=exceeded)


def _task_exceeded(task: "TaskReport", limits: Limits) -> list[str]:
    found = []
    if task.abstention_rate > limits.max_abstention_rate:
        found.append(f"{task.task}: abstention rate {task.abstention_rate:.3f} > {limits.max_abstention_rate:g}")
    if task.psi is not None and task.psi > limits.max_psi:
        found.append(f"{task.task}: PSI {task.psi:.3f} > {limits.max_psi:g} (classes and abstention "
                     f"against the published state)")
    if task.changed_rate is not None and task.changed_rate > limits.max_changed_rate:
        found.append(f"{task.task}: changed {task.changed_rate:.3f} of rescored products > "
                     f"{limits.max_changed_rate:g}")
    return found
