"""Refuse a trigger whose conf names a param the DAG does not take, before any run exists.

Airflow merges every key of a run's conf into its params without complaint (apache/airflow#29018), so a
misspelt `epoch` would run on the default `epochs`. Each cmaclip DAG's `validate` task refuses it once the
run has started; this API-server middleware refuses it at the trigger itself, with HTTP 400 naming the
unknown keys and the DAG's params. It covers the requests that create runs with a conf: a trigger
(`POST /api/v2/dags/{dag_id}/dagRuns`, which the UI's trigger form posts to as well) and a backfill
(`POST /api/v2/backfills` and its dry run, the form's backfill mode). `airflow dags trigger` and
`dags test` do not go through the API and keep the run-time check only.

The params are those of the DAG's latest serialized version in the metadata DB (what Airflow itself
validates the conf against), and only DAGs tagged `cmaclip` opt in. A caller the API would refuse (no
token, no right to trigger that DAG) is passed through to get Airflow's own 401/403, so the params of a
DAG are never shown to them. Every other request passes through untouched, unbuffered.
"""
from __future__ import annotations

import json
import re

from airflow.plugins_manager import AirflowPlugin

OPT_IN_TAG = "cmaclip"
# Each request that creates runs with a conf: the pattern of its path and the body's key for the conf. A
# trigger names its DAG in the path, a backfill in the body.
CREATES_RUNS = ((re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?"), "conf"),
                (re.compile(r"/api/v2/backfills(/dry_run)?/?"), "dag_run_conf"))


def refusal(dag_id: str | None, conf_key: str, body: bytes) -> dict | None:
    """The 400 body for a request on an opted-in DAG whose conf has unknown top-level keys, else None (a
    body that is not a JSON object with an object conf and a DAG id is left to the API to answer)."""
    from airflow.models.serialized_dag import SerializedDagModel

    from pipeline.orchestration.airflow_tasks import check_param_names

    try:
        request = json.loads(body)
        conf, dag_id = request.get(conf_key), dag_id or request.get("dag_id")
    except (ValueError, AttributeError):
        return None
    if not isinstance(conf, dict) or not conf or not isinstance(dag_id, str):
        return None
    dag = SerializedDagModel.get_dag(dag_id)
    if dag is None or OPT_IN_TAG not in dag.tags:
        return None
    allowed = sorted(dag.params.keys())
    try:
        check_param_names(conf, allowed)  # the message `validate` fails a run with, said at trigger
    except ValueError as exc:
        return {"detail": f"{dag_id}: {exc}", "dag_id": dag_id, "unknown": sorted(set(conf) - set(allowed)),
                "allowed": allowed}
    return None


async def may_trigger(scope, dag_id: str) -> bool:
    """Whether the API would let this caller trigger `dag_id` (Airflow's own authentication and check)."""
    from fastapi import HTTPException
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api import security

    request = Request(scope)
    try:
        user = await security.get_user(request, None, await security.bearer_scheme(request))
        check = security.requires_access_dag("POST", DagAccessEntity.RUN, param_dag_id=dag_id)
        await run_in_threadpool(check, request, user)
    except HTTPException:
        return False
    return True


def creates_runs(scope) -> tuple[str | None, str] | None:
    """(the DAG id in the path, the body's key for the conf) for a request that creates runs, else None."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"].removeprefix(scope.get("root_path", ""))
    for pattern, conf_key in CREATES_RUNS:
        if match := pattern.fullmatch(path):
            return match.groupdict().get("dag_id"), conf_key
    return None


class UnknownParamsGuard:
    """Pure ASGI middleware: reads the body of a request that creates runs only, then replays it to the app."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        route = creates_runs(scope)
        if route is None:
            return await self.app(scope, receive, send)
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import JSONResponse

        messages = [await receive()]
        while messages[-1]["type"] == "http.request" and messages[-1].get("more_body"):
            messages.append(await receive())
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        refused = await run_in_threadpool(refusal, *route, body)
        if refused and await may_trigger(scope, refused["dag_id"]):
            return await JSONResponse(refused, status_code=400)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class CmaclipTriggerGuard(AirflowPlugin):
    name = "cmaclip_trigger_guard"
    fastapi_root_middlewares = [{"name": "cmaclip unknown-params guard", "middleware": UnknownParamsGuard}]
