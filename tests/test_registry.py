"""The registry gate: champion and challenger compared on one frozen test split; a better challenger is
promoted, a worse one refused, a forced promotion and a stale comparison behave as documented.

'Better' and 'worse' are honest: the trained tiny model against the same architecture with the same
labels, randomly initialised and never trained. Only the random model is constructed here; both are
evaluated by `compare` on the dataset's test split like any other pair of versions."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mlflow_support import REPO_ROOT, home, log_untrained_model, mlflow_home, trained  # noqa: F401 (fixtures)
from pipeline import settings
from pipeline.cli import main
from pipeline.tracking import descriptions, pyfunc, registry, tracker

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
    assert _tag("1", "verdict") == registry.FIRST_VERSION
    better = registry.register(trained["result"]["run_id"], NAME)
    assert (better["version"], better["alias"]) == ("2", "challenger")
    assert _tag("2", "verdict") == registry.NOT_COMPARED

    comparison = registry.compare(NAME, tolerance=TOLERANCE)  # on the challenger's own dataset by default
    print(comparison.table)
    assert comparison.dataset_uri == dataset
    assert (comparison.champion, comparison.challenger) == ("1", "2") and comparison.n > 0
    assert set(comparison.agreement) == {"color", "pattern", "style"}
    assert all(0.0 <= a <= 1.0 for a in comparison.agreement.values())
    assert comparison.gate["passed"], comparison.table
    assert _tag("2", "verdict") == registry.PASSED_NOT_PROMOTED
    decision = registry.promote(NAME, comparison.as_dict(), tolerance=TOLERANCE)  # as XCom carries it
    assert decision["promoted"] and _aliases() == {"champion": "2", "previous_champion": "1"}
    assert _tag("2", "verdict").startswith("promoted: gate passed")
    described = registry.description(NAME, "2")
    assert "**promoted**" in described and "| color " in described and comparison.run_id in described
    assert trained["result"]["run_id"] in described and dataset in described  # lineage
    assert "replaced as champion by v2" in registry.description(NAME, "1")

    worse = registry.register(log_untrained_model(checkpoint, tmp_path / "untrained-1", seed=1), NAME)
    assert (worse["version"], worse["alias"]) == ("3", "challenger")
    with pytest.raises(ValueError, match="records no dataset"):  # logged by hand: no dataset to default to
        registry.compare(NAME, tolerance=TOLERANCE)
    refused = registry.compare(NAME, dataset, tolerance=TOLERANCE)
    print(refused.table)
    assert not refused.gate["passed"] and refused.gate["mean_delta"] < 0
    # Refused by the comparison itself (the DAG skips promote then): the verdict and the table are there.
    assert _tag("3", "verdict").startswith("refused: ")
    described = registry.description(NAME, "3")
    assert "**refused**" in described and "| color " in described and refused.run_id in described
    decision = registry.promote(NAME, refused, tolerance=TOLERANCE)
    assert not decision["promoted"] and _aliases() == {"champion": "2", "challenger": "3", "previous_champion": "1"}
    assert _tag("3", "verdict") == decision["reason"] and decision["reason"].startswith("refused:")

    # Both comparisons are recorded: an evaluation run each, and tags on the challenger pointing at it.
    c = tracker.client()
    recorded = c.get_run(refused.run_id)
    assert recorded.data.params["champion_version"] == "2" and "agreement/color" in recorded.data.metrics
    assert _tag("3", "comparison_run") == refused.run_id
    assert registry.load_comparison(refused.run_id).gate == refused.gate

    forced = registry.promote(NAME, refused, force=True)
    assert forced["promoted"] and forced["reason"].startswith("forced despite")
    assert _aliases() == {"champion": "3", "previous_champion": "2"}
    stale = registry.promote(NAME, comparison)  # made against v1, which is no longer the champion
    assert not stale["promoted"] and "champion is now v3" in stale["reason"]
    assert _aliases() == {"champion": "3", "previous_champion": "2"}

    assert registry.rollback(NAME) == {"name": NAME, "champion": "2", "rolled_back_from": "3"}
    assert _aliases() == {"champion": "2"} and "champion returned to v2" in _tag("3", "rolled_back")


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


def _registered(c, experiment: str, name: str, count: int) -> list[str]:
    """`count` versions of `name`, each from a run of its own with a (weightless) logged model."""
    runs = []
    for i in range(count):
        tags = {tracker.KIND_TAG: "training", tracker.AIRFLOW_DAG_TAG: "cmaclip_retrain",
                tracker.AIRFLOW_RUN_TAG: f"manual__2026-12-01T11:3{i}:00+00:00"}
        run_id = c.create_run(experiment, run_name=f"r{i}", tags=tags).info.run_id
        tracker.log_params(c, run_id, {"dataset.uri": f"/data/set-{i}", "dataset.fingerprint": f"fp{i}"})
        c.create_logged_model(experiment, name=pyfunc.MODEL_NAME, source_run_id=run_id)
        runs.append(run_id)
        assert registry.register(run_id, name)["version"] == str(i + 1)
    return runs


def test_promotion_sets_previous_champion_and_rollback_restores_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CMACLIP_MLFLOW_UI_URL", "http://mlflow.example:5000/")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://airflow.example:8080")
    with mlflow_home(tmp_path):
        c = tracker.client()
        experiment = settings.experiment_id("versions")
        runs = _registered(c, experiment, NAME, 3)
        assert c.get_run(runs[2]).info.run_name == "r2 → v3"  # the training run names its version
        # The description links the training run (in MLflow's model-training view) and the Airflow run.
        lineage = descriptions.parse(registry.description(NAME, "3"))[descriptions.LINEAGE]
        assert (f"[r2 → v3](http://mlflow.example:5000/#/experiments/{experiment}/runs/{runs[2]}"
                "?workflowType=machine_learning)") in lineage
        assert ("(http://airflow.example:8080/dags/cmaclip_retrain/runs/manual__2026-12-01T11%3A32%3A00%2B00%3A00)"
                in lineage) and "`/data/set-2` (fingerprint `fp2`)" in lineage
        assert registry.training_dataset(NAME, "3") == "/data/set-2"
        # Comparisons as XCom carries them; promote decides from their numbers alone.
        better = _comparison({"color": (0.5, 0.5)}, {"color": (0.7, 0.7)})
        worse = _comparison({"color": (0.7, 0.7)}, {"color": (0.3, 0.3)})
        for comparison, (champion, challenger) in ((better, ("1", "2")), (worse, ("2", "3"))):
            comparison.name, comparison.champion, comparison.challenger = NAME, champion, challenger
        assert registry.promote(NAME, better.as_dict())["promoted"]
        assert _aliases() == {"champion": "2", "previous_champion": "1", "challenger": "3"}
        assert not registry.promote(NAME, worse.as_dict())["promoted"]
        assert _tag("3", "verdict").startswith("refused: color accuracy 0.3000 < champion 0.7000")
        assert "**refused**" in registry.description(NAME, "3")

        assert main(["registry", "rollback", "--name", NAME]) == 0
        assert "champion is v1 again (rolled back from v2)" in capsys.readouterr().out
        assert _aliases() == {"champion": "1", "challenger": "3"}
        assert "champion returned to v1" in _tag("2", "rolled_back")
        assert registry.description(NAME, "1").rstrip().endswith("champion again: rolled back from v2")
        assert main(["registry", "rollback", "--name", NAME]) == 2  # one step back only
        assert "no previous_champion" in capsys.readouterr().err

        assert main(["registry", "list", "--name", NAME]) == 0
        table = capsys.readouterr().out
        assert "refused: color accuracy" in table and "previous_champion" not in table
        tags = {k for v in registry.list_versions(NAME) for k in v["tags"]}
        assert tags <= {"cmaclip.verdict", "cmaclip.rolled_back"}  # few tags: MLflow's table shows them whole


def test_description_sections_are_replaced_and_the_history_appended():
    text = descriptions.update(None, {descriptions.VERDICT: "**pending**"}, "registered")
    text = text + "\n### Notes by hand\n\nkeep me\n"
    text = descriptions.update(text, {descriptions.VERDICT: "**refused**: worse",
                                      descriptions.COMPARISON: "| a |"}, "compared")
    sections = descriptions.parse(text)
    assert sections[descriptions.VERDICT] == "**refused**: worse" and sections["Notes by hand"] == "keep me"
    assert [line.split(": ", 1)[1] for line in descriptions.history(text)] == ["registered", "compared"]
    # Ours in their order, the hand-written one kept after them.
    assert list(sections) == [descriptions.VERDICT, descriptions.COMPARISON, descriptions.HISTORY, "Notes by hand"]
    assert text.startswith("**refused**: worse\n")  # the first line: what MLflow's versions table shows


def test_the_registry_commands_start_without_torch():
    """`registry list` must answer in seconds: importing the CLI and the registry loads no torch (its
    import alone took most of the 25 s `registry list` once needed); only compare does, when it runs."""
    probe = ("import sys, pipeline.cli, pipeline.tracking.registry; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'matplotlib')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
