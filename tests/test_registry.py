"""The registry gate: champion and challenger compared on one frozen test split; a better challenger is
promoted, a worse one refused, a forced promotion and a stale comparison behave as documented.

'Better' and 'worse' are honest: the trained tiny model against the same architecture with the same
labels, randomly initialised and never trained. Only the random model is constructed here; both are
evaluated by `compare` on the dataset's test split like any other pair of versions."""
from __future__ import annotations

import pytest

from mlflow_support import home, log_untrained_model, mlflow_home, trained  # noqa: F401 (fixtures)
from pipeline import settings
from pipeline.cli import main
from pipeline.tracking import pyfunc, registry, tracker

NAME = "cmaclip-gate"  # its own registered model: the training's `cmaclip` versions stay untouched
# One test product is ~0.02 of a task's accuracy on this ~50-product test split, and a task's sampling noise
# ~0.06; the per-task tolerance must be above that or the gate measures noise. The trained model's mean
# gain (~+0.1) is what makes it better; the untrained one loses on the mean whatever the tolerance.
TOLERANCE = 0.05
# MLflow's filter grammar has no escapes: a value is quoted with the kind of quote it lacks, and one with
# both is matched with LIKE (`O_Brien "x"`), which the decoy must not slip through.
QUOTED = ["O'Brien", 'say "x"', 'O\'Brien "x"', 'back\\slash \' " \\']
DECOY = 'O-Brien "x"'


def _aliases() -> dict[str, str]:
    return {a: str(v) for a, v in tracker.client().get_registered_model(NAME).aliases.items()}


def _tag(version: str, key: str) -> str:
    return tracker.client().get_model_version(NAME, version).tags.get(f"cmaclip.{key}", "")


@pytest.mark.slow
def test_gate_promotes_a_better_challenger_and_refuses_a_worse_one(trained, home, tmp_path):
    checkpoint, dataset = trained["result"]["checkpoint"], trained["dataset"]
    untrained = log_untrained_model(checkpoint, tmp_path / "untrained-0", seed=0)
    assert registry.register(untrained, NAME)["alias"] == "champion"            # v1: the first version
    assert registry.register(untrained, NAME)["version"] == "1"                  # a retry: no new version
    better = registry.register(trained["result"]["run_id"], NAME)
    assert (better["version"], better["alias"]) == ("2", "challenger")

    comparison = registry.compare(NAME, dataset, tolerance=TOLERANCE)
    print(comparison.table)
    assert (comparison.champion, comparison.challenger) == ("1", "2") and comparison.n > 0
    assert set(comparison.agreement) == {"color", "pattern", "style"}
    assert all(0.0 <= a <= 1.0 for a in comparison.agreement.values())
    assert comparison.gate["passed"], comparison.table
    decision = registry.promote(NAME, comparison.as_dict(), tolerance=TOLERANCE)  # as XCom carries it
    assert decision["promoted"] and _aliases() == {"champion": "2"}
    assert _tag("2", "promotion").startswith("gate passed") and _tag("1", "replaced_by") == "2"

    worse = registry.register(log_untrained_model(checkpoint, tmp_path / "untrained-1", seed=1), NAME)
    assert (worse["version"], worse["alias"]) == ("3", "challenger")
    refused = registry.compare(NAME, dataset, tolerance=TOLERANCE)
    print(refused.table)
    assert not refused.gate["passed"] and refused.gate["mean_delta"] < 0
    decision = registry.promote(NAME, refused, tolerance=TOLERANCE)
    assert not decision["promoted"] and _aliases() == {"champion": "2", "challenger": "3"}
    assert _tag("3", "promotion").startswith("refused:")

    # Both comparisons are recorded: an evaluation run each, and tags on the versions pointing at it.
    c = tracker.client()
    recorded = c.get_run(refused.run_id)
    assert recorded.data.params["champion_version"] == "2" and "agreement/color" in recorded.data.metrics
    assert _tag("3", "comparison_run") == refused.run_id
    assert registry.load_comparison(refused.run_id).gate == refused.gate

    forced = registry.promote(NAME, refused, force=True)
    assert forced["promoted"] and forced["reason"].startswith("forced despite") and _aliases() == {"champion": "3"}
    stale = registry.promote(NAME, comparison)  # made against v1, which is no longer the champion
    assert not stale["promoted"] and "champion is now v3" in stale["reason"] and _aliases() == {"champion": "3"}


@pytest.mark.slow
def test_cli_lists_versions_and_refuses_unknown_models(trained, home, capsys):
    assert main(["registry", "list", "--name", "cmaclip"]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and trained["result"]["run_id"] in out
    assert main(["registry", "list", "--name", "no-such-model"]) == 2
    assert "no registered model" in capsys.readouterr().err


@pytest.mark.slow
def test_resolving_an_unknown_alias_says_so(trained, home):
    with pytest.raises(ValueError, match="no version with alias 'staging'"):
        registry.resolve_checkpoint("models:/cmaclip@staging")
    assert settings.is_sqlite(settings.tracking_uri())


def _comparison(champion: dict[str, tuple[float, float]], challenger: dict[str, tuple[float, float]]):
    as_metrics = lambda per_task: {t: {"accuracy": a, "recall_at_precision": r}  # noqa: E731
                                   for t, (a, r) in per_task.items()}
    return registry.Comparison("m", "dataset", "1", "2", {"champion": as_metrics(champion),
                               "challenger": as_metrics(challenger)}, {t: 1.0 for t in champion}, 100)


def test_gate_rule_no_task_worse_than_the_tolerance_and_the_mean_better():
    old = {"color": (0.80, 0.50), "style": (0.40, 0.10)}
    assert registry.gate(_comparison(old, {"color": (0.90, 0.60), "style": (0.40, 0.10)}))["passed"]
    # Style loses 0.02 accuracy: beyond a 0.01 tolerance, within 0.05; the mean gain is the same.
    mixed = _comparison(old, {"color": (0.90, 0.60), "style": (0.38, 0.10)})
    refused = registry.gate(mixed, tolerance=0.01)
    assert not refused["passed"] and refused["failures"] == ["style accuracy 0.3800 < champion 0.4000 - 0.01"]
    assert registry.gate(mixed, tolerance=0.05)["passed"]
    # Equal is not better; a missing task fails.
    assert not registry.gate(_comparison(old, old))["passed"]
    assert not registry.gate(_comparison(old, {"color": (1.0, 1.0)}))["passed"]
    table = registry.format_comparison(mixed)
    assert "color" in table and "mean" in table and "v1" in table and "v2" in table


def test_quotes_in_model_names_run_names_and_tags_are_found_exactly(tmp_path):
    with mlflow_home(tmp_path):
        c = tracker.client()
        experiment = settings.experiment_id("quotes")
        runs = {}
        for value in [*QUOTED, DECOY]:
            run_id = c.create_run(experiment, run_name=value, tags={"cmaclip.note": value}).info.run_id
            c.create_logged_model(experiment, name=pyfunc.MODEL_NAME, source_run_id=run_id)
            runs[value] = run_id
            assert registry.register(run_id, value)["version"] == "1"
        for value, run_id in runs.items():
            for key in ("attributes.run_name", "tags.`cmaclip.note`"):
                found = c.search_runs([experiment], filter_string=tracker.search_filter({key: value}))
                assert run_id in [r.info.run_id for r in found], (key, value)
            assert pyfunc.logged_model_uri(run_id) is not None
            again = registry.register(run_id, value)  # a retry finds the version made from this run
            assert (again["version"], again["alias"]) == ("1", "champion")
            assert [(v["version"], v["run_id"]) for v in registry.list_versions(value)] == [("1", run_id)]
