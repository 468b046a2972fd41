"""plugins/cmaclip_trigger_guard.py: the API server refuses a trigger (or a backfill) whose conf names a param
the DAG does not take, before any run exists, and passes every other request through.

The API app is Airflow's own (`create_app`) with the plugins folder of the embedded environment, on a
migrated SQLite DB where `airflow dags reserialize` wrote the DAGs, as a scheduler's DAG processor would."""
from __future__ import annotations

import runpy
import textwrap
from pathlib import Path

import pytest

from pipeline.orchestration import airflow_home

REPO_ROOT = Path(__file__).resolve().parents[1]
RETRAIN = "cmaclip_retrain"
SCORING = "cmaclip_nightly_scoring"


@pytest.fixture(scope="module")
def api(airflow_env, tmp_path_factory):
    """A TestClient on the API app, the DAGs serialized, and a bearer token per role of the simple auth
    manager."""
    from airflow import plugins_manager
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "test-only-" + "s" * 64)
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,viewer:viewer")
        airflow_home.prepare(airflow_env["home"])
        airflow_home.run_airflow(["dags", "reserialize"], airflow_env["env"])
        _serialize_untagged_dag(tmp_path_factory.mktemp("untagged"))
        # The plugins (and the app) of an earlier module may be cached with another plugins folder.
        plugins_manager._get_plugins.cache_clear()
        plugins_manager.get_fastapi_plugins.cache_clear()
        purge_cached_app()
        app = create_app()
        auth = app.state.auth_manager
        tokens = {role: auth.generate_jwt(SimpleAuthManagerUser(username=role, role=role))
                  for role in ("admin", "viewer")}
        with TestClient(app) as client:
            yield {"client": client, "tokens": tokens}
        purge_cached_app()


def _serialize_untagged_dag(folder: Path) -> None:
    """A DAG without the `cmaclip` tag, written to the DB the way `dags reserialize` writes a bundle's."""
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    (folder / "untagged.py").write_text(textwrap.dedent("""
        from airflow.sdk import DAG, Param
        dag = DAG("untagged", schedule=None, params={"known": Param(1, type="integer")})
    """))
    bag = BundleDagBag(str(folder), bundle_path=folder, bundle_name="dags-folder")
    assert bag.import_errors == {} and "untagged" in bag.dag_ids
    sync_bag_to_db(bag, "dags-folder", None)


def _trigger(api, dag_id: str, conf: dict, role: str | None = "admin"):
    headers = {"Authorization": f"Bearer {api['tokens'][role]}"} if role else {}
    return api["client"].post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf},
                              headers=headers)


def _runs(dag_id: str) -> list[dict]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return [run.conf for run in session.query(DagRun).filter_by(dag_id=dag_id)]


def test_an_unknown_top_level_param_is_refused_at_trigger_and_no_run_is_created(api):
    before = _runs(RETRAIN)
    response = _trigger(api, RETRAIN, {"epoch": {"warmup": 1}, "config": "tiny"})
    assert response.status_code == 400, response.text
    body = response.json()
    assert "unknown param 'epoch' (did you mean 'epochs'?)" in body["detail"]
    assert body["unknown"] == ["epoch"]
    # The allowed keys are the DAG file's params, as the metadata DB records them.
    assert body["allowed"] == sorted(runpy.run_path(str(REPO_ROOT / "dags" / f"{RETRAIN}.py"))["PARAMS"])
    assert _runs(RETRAIN) == before


def test_a_trigger_with_known_params_is_accepted(api):
    before = _runs(RETRAIN)
    response = _trigger(api, RETRAIN, {"epochs": {"warmup": 1}, "config": "tiny"})
    assert response.status_code == 200, response.text
    assert response.json()["dag_id"] == RETRAIN
    created = _runs(RETRAIN)[len(before):]
    assert len(created) == 1 and created[0]["epochs"] == {"warmup": 1} and created[0]["config"] == "tiny"


def test_a_backfill_with_an_unknown_param_is_refused_and_none_is_created(api):
    from airflow.models.backfill import Backfill
    from airflow.utils.session import create_session

    headers = {"Authorization": f"Bearer {api['tokens']['admin']}"}
    body = {"dag_id": SCORING, "from_date": "2026-01-01T00:00:00Z", "to_date": "2026-01-03T00:00:00Z",
            "dag_run_conf": {"modle": "models:/cmaclip/1"}}
    for path in ("/api/v2/backfills/dry_run", "/api/v2/backfills"):   # the form previews, then creates
        response = api["client"].post(path, json=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        assert "unknown param 'modle' (did you mean 'model'?)" in response.json()["detail"]
    with create_session() as session:
        assert session.query(Backfill).filter_by(dag_id=SCORING).count() == 0


@pytest.mark.parametrize("role, status", [(None, 401), ("viewer", 403)])
def test_a_caller_the_api_refuses_learns_nothing_of_the_params(api, role, status):
    response = _trigger(api, RETRAIN, {"epoch": {"warmup": 1}}, role=role)
    assert response.status_code == status, response.text
    assert "epochs" not in response.text


def test_a_dag_that_does_not_opt_in_is_passed_through(api):
    response = _trigger(api, "untagged", {"unknown": 1})
    assert response.status_code == 200, response.text   # Airflow itself merges the key into the params
    assert _runs("untagged")[-1] == {"unknown": 1}


def test_a_body_that_is_not_json_gets_airflows_own_answer(api):
    response = api["client"].post(f"/api/v2/dags/{RETRAIN}/dagRuns", content=b"{not json",
                                  headers={"Authorization": f"Bearer {api['tokens']['admin']}",
                                           "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
