"""Smoke test of the paper protocol (bench/paper.py) on a tiny slice of the real data: every output is
produced and consistent. Numbers are not checked: one epoch of a tiny model on 200 products means nothing."""
import json
import math

import pytest

from pipeline.experiments import run_and_report
from pipeline.paper_options import FASHION_SMALL, Options

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_SMALL.exists(), reason=f"shared data {FASHION_SMALL} is absent"),
]


def _strict(text: str):
    """json.loads that refuses NaN and Infinity, which strict JSON readers reject."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("CMACLIP_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    opts = Options(config="tiny", limit=200, work_dir=str(home / "paper"), results_dir=str(home / "results"),
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
    report = open(f"{out}/paper.md").read()
    for section in ("Table 2", "Table 6", "Table 5", "Figure 2", "random weights", "Reproduce:"):
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
        assert set(runs) == {"clean", "label_words_removed", "titles_swapped"}
        assert runs["clean"] == results["models"][model]["test"]


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
