"""Smoke test of the paper protocol (paper/protocol.py: `cmaclip-paper`, bench/paper.py) on a tiny slice of
the real data: every output is produced and consistent. Numbers are not checked: one epoch of a tiny model
on 200 products means nothing.
The config turns on two training choices (label-word removal in tuning, the modality loss end to end), so
the ablation of each runs too."""
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

import cmaclip
from cmaclip.checkpoint import read_checkpoint_meta
from paper.ablations import with_stages
from paper.options import FASHION_SMALL, Options
from paper.protocol import run_and_report

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_SMALL.exists(), reason=f"shared data {FASHION_SMALL} is absent"),
]


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, which strict JSON readers reject."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


CONDITIONS = {"clean", "label_words_removed", "titles_swapped"}


def _config_with_choices(path: Path) -> str:
    config = cmaclip.load_config("tiny")
    for stage, changes in {"tuning": {"remove_label_words": 0.5}, "end_to_end": {"modality_loss": 0.3}}.items():
        config = with_stages(config, {stage: dataclasses.replace(config.train.stages[stage], **changes)})
    path.write_text(config.to_json())
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("CMACLIP_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    opts = Options(config=_config_with_choices(home / "choices.json"), limit=200, work_dir=str(home / "paper"), results_dir=str(home / "results"),
                   epochs={"warmup": 1, "end_to_end": 1, "tuning": 1}, contrastive_epochs=1,
                   variants=("cma-clip", "no-modality-attention"), attention_examples=2, threads="1")
    try:
        yield opts, run_and_report(opts)
    finally:
        mp.undo()


def test_outputs_are_written(run):
    opts, results = run
    out = opts.results_dir
    stored = _strict(open(f"{out}/paper.json").read())
    assert stored["models"].keys() == results["models"].keys()
    report = re.sub(r" +", " ", open(f"{out}/paper.md").read())  # table cells are padded to their column
    for section in ("Table 2", "Table 6", "Table 5", "Figure 2", "random weights", "Reproduce:",
                    "Calibration: precision reached at the stored threshold", "Ablation of the training choices",
                    "| CMA-CLIP w/o MA | titles swapped |", "title corruption (tuning: remove_label_words=0.5)"):
        assert section in report
    for example in results["attention"]:
        assert 0 < example["bytes"] < 100_000
        assert open(f"{out}/{example['png']}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_raw_clip_is_not_run_without_weights(run):
    _, results = run
    assert "random init" in results["models"]["raw-clip"]["not_run"]
    baseline = results["models"]["fine-tuned-clip"]
    assert "test" in baseline and 0.0 <= baseline["title_retrieval"]["top1"] <= 1.0
    assert len(baseline["contrastive_loss"]) == 1


def test_every_model_is_scored_on_the_same_test_products(run):
    _, results = run
    counts = {k: m["test"]["color"]["n"] for k, m in results["models"].items() if "test" in m}
    assert len(set(counts.values())) == 1, counts
    for model in ("cma-clip", "no-modality-attention"):
        runs = results["robustness"][model]
        assert set(runs) == CONDITIONS
        for task in results["protocol"]["tasks"]:  # every title condition scores the same products
            assert {r[task]["n"] for r in runs.values()} == {results["models"][model]["test"][task]["n"]}


def test_noise_does_what_it_says(run):
    _, results = run
    named, changed = results["noise"]["label_named"], results["noise"]["titles_changed"]
    assert named["label_words_removed"]["color"] == 0.0
    assert named["clean"]["color"] > 0.5
    assert changed["clean"] == 0.0 and changed["titles_swapped"] > 0.9


def test_lambda_is_fixed_without_modality_attention(run):
    _, results = run
    for cond in results["robustness"]["no-modality-attention"].values():
        assert math.isclose(cond["color"]["image_weight"], 0.5, abs_tol=1e-6)


def test_mlflow_run_has_the_figures(run):
    import mlflow
    from pipeline import settings

    _, results = run
    settings.configure()
    got = mlflow.get_run(results["mlflow_run_id"])
    assert got.data.metrics["models.cma-clip.mean_recall_at_precision"] == pytest.approx(
        results["models"]["cma-clip"]["test"]["mean_recall_at_precision"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(results["mlflow_run_id"])}
    assert {"paper.md", "paper.json", "attention"} <= artifacts


def test_calibration_uses_the_stored_thresholds(run):
    _, results = run
    assert set(results["calibration"]) == {"cma-clip", "no-modality-attention"}
    for model, runs in results["calibration"].items():
        assert set(runs) == CONDITIONS
        stored = read_checkpoint_meta(Path(results["run_dir"]) / model / "tuning" / "best").thresholds
        for cond in runs.values():
            for task, cell in cond.items():
                assert cell["threshold"] == (stored[task] if math.isfinite(stored[task]) else None)
                assert 0.0 <= cell["coverage"] <= 1.0
                if cell["coverage"] == 0.0:
                    assert cell["precision"] is None  # NaN, written as null
                else:
                    assert 0.0 <= cell["precision"] <= 1.0


def test_contributions_of_the_fused_models(run):
    _, results = run
    contributions = results["contributions"]
    assert set(contributions) == {"cma-clip", "no-modality-attention"}
    for runs in contributions.values():
        assert set(runs) == CONDITIONS
        for cond in runs.values():
            assert set(cond) == set(results["protocol"]["tasks"])
            for cell in cond.values():
                assert all(-1.0 <= cell[m] <= 1.0 for m in ("title", "image"))


def test_one_ablation_per_choice_reusing_earlier_stages(run):
    _, results = run
    rows = {r["group"]: r for r in results["ablations"]["rows"]}
    assert list(rows) == ["title corruption", "modality loss"]
    full = Path(results["run_dir"]) / "cma-clip"
    tuning = rows["title corruption"]
    assert list(tuning["stages"]) == ["tuning"] and tuning["reused_stages"] == ["warmup", "end_to_end"]
    assert tuning["started_from"] == str(full / "end_to_end" / "best")
    folder = Path(results["run_dir"]) / "ablations" / tuning["name"]
    assert sorted(p.name for p in folder.iterdir()) == ["tuning"]  # warm-up and end-to-end not retrained
    trained = read_checkpoint_meta(folder / "tuning" / "best").config.train.stages
    assert trained["tuning"].remove_label_words == 0.0 and trained["end_to_end"].modality_loss == 0.3
    end_to_end = rows["modality loss"]
    assert list(end_to_end["stages"]) == ["end_to_end", "tuning"]
    assert end_to_end["started_from"] == str(full / "warmup" / "best")
    for row in rows.values():
        assert set(row["test"]) == CONDITIONS
        assert all(0.0 <= m["mean_accuracy"] <= 1.0 for m in row["test"].values())
