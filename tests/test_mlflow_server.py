"""The same flow against a real `mlflow server` on 127.0.0.1 (REST tracking and registry, proxied
artifacts): train the three stages, register, load the pyfunc in a fresh process, compare and gate."""
from __future__ import annotations

import contextlib

import pandas as pd
import pytest

import servers
from mlflow_support import fresh_process_predict, log_untrained_model, mlflow_home, sample_frame
from pipeline import settings
from pipeline.ingest.dataset import ingest
from pipeline.synthetic import make_catalog
from pipeline.tracking import registry, tracker
from pipeline.training import trainer

pytestmark = [pytest.mark.slow, pytest.mark.services]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` (SQLite backend, proxied artifacts on local disk) from tests/servers.py; skips with
    the server's own words if it does not come up."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(servers.mlflow_server(f"sqlite:///{root / 'server.db'}",
                                                            str(root / "artifacts"), root / "server.log"))
        except RuntimeError as exc:
            pytest.skip(str(exc))
        yield {"url": url, "root": root}


def test_train_register_serve_and_gate_through_the_server(server, tmp_path):
    # A smaller catalog than the SQLite tests use: this test checks the plumbing, not the model.
    make_catalog(160, str(tmp_path / "catalog.parquet"), seed=3)
    dataset = str(tmp_path / "dataset")
    ingest(str(tmp_path / "catalog.parquet"), "color,pattern,style", dataset, min_class_count=1)
    with mlflow_home(tmp_path / "home", tracking_uri=server["url"]):
        assert settings.tracking_uri() == server["url"]
        result = trainer.train("tiny", dataset, str(tmp_path / "training"), epochs=1, print_fn=None)
        c = tracker.client()

        parent = c.get_run(result["run_id"])
        assert parent.info.status == "FINISHED" and parent.data.params["dataset.uri"] == dataset
        children = c.search_runs([parent.info.experiment_id],
                                 filter_string=f"tags.`{tracker.PARENT_TAG}` = '{result['run_id']}'")
        assert sorted(r.data.tags[tracker.STAGE_TAG] for r in children) == ["end_to_end", "tuning", "warmup"]
        for run in children:
            assert [m.step for m in c.get_metric_history(run.info.run_id, "val/color/accuracy")] == [0]
            names = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
            assert names == {"checkpoint/model.safetensors", "checkpoint/cmaclip.json"}
        # The server stored the artifacts (proxied), not this process's home.
        assert list((server["root"] / "artifacts").rglob("model.safetensors"))
        assert not (tmp_path / "home" / "mlartifacts").exists()

        assert result["registered"]["alias"] == "champion"
        frame = sample_frame(dataset)
        frame.to_pickle(tmp_path / "in.pkl")
        uri = "models:/cmaclip@champion"
        fresh_process_predict(uri, tmp_path / "in.pkl", tmp_path / "out.pkl",
                              {"MLFLOW_TRACKING_URI": server["url"], "HF_HUB_OFFLINE": "1"})
        fresh = pd.read_pickle(tmp_path / "out.pkl")
        direct, _ = registry.load_predictor(uri).predict_frame(frame)
        scored = fresh[fresh["quarantine_reason"].isna()]
        assert list(scored["color_top"]) == list(direct["color_top"])
        assert list(scored["color_confidence"]) == list(direct["color_confidence"])

        untrained = registry.register(log_untrained_model(result["checkpoint"], tmp_path / "untrained"))
        assert (untrained["version"], untrained["alias"]) == ("2", "challenger")
        comparison = registry.compare("cmaclip", dataset)
        decision = registry.promote("cmaclip", comparison)
        assert decision["promoted"] == comparison.gate["passed"]
        champion = "2" if decision["promoted"] else "1"
        assert str(c.get_model_version_by_alias("cmaclip", "champion").version) == champion
        assert c.get_model_version("cmaclip", "2").tags["cmaclip.comparison_run"] == comparison.run_id
        assert [v["version"] for v in registry.list_versions("cmaclip")] == ["2", "1"]
