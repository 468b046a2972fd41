"""deploy/minio: each policy names its own bucket only, and create-buckets.sh (run twice, as every
`docker compose up` runs it) makes the buckets and gives each service key the policy on its bucket.

No MinIO is needed: a stand-in `mc` on PATH records the calls and the policy files it is given."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "minio"
SHELLS = [shell for shell in ("dash", "bash") if shutil.which(shell)]  # the mc image's /bin/sh is bash

FAKE_MC = r"""#!/bin/sh
echo "$*" >> "$MC_LOG/calls"
case "$1 $2 $3" in
    "admin policy create") cp "$6" "$MC_LOG/$5.json" ;;
    "admin policy attach")
        if [ -e "$MC_LOG/attached-$5-$7" ]; then
            echo "mc: <ERROR> The specified policy change is already in effect." >&2
            exit 1
        fi
        touch "$MC_LOG/attached-$5-$7" ;;
esac
"""
ENV = {"MINIO_ROOT_USER": "root", "MINIO_ROOT_PASSWORD": "root-secret", "MLFLOW_BUCKET": "ml-artifacts",
       "DATA_BUCKET": "catalog-data", "MINIO_MLFLOW_ACCESS_KEY": "key-mlflow", "MINIO_MLFLOW_SECRET_KEY": "s-mlflow",
       "MINIO_PIPELINE_ACCESS_KEY": "key-pipeline", "MINIO_PIPELINE_SECRET_KEY": "s-pipeline"}


def _resources(policy: dict) -> set[str]:
    return {r for statement in policy["Statement"] for r in statement["Resource"]}


@pytest.mark.parametrize("name", ["mlflow", "pipeline"])
def test_policy_allows_object_access_to_one_bucket_only(name):
    policy = json.loads((DEPLOY / f"policy-{name}.json").read_text())
    assert _resources(policy) == {"arn:aws:s3:::${BUCKET}", "arn:aws:s3:::${BUCKET}/*"}
    actions = {a for statement in policy["Statement"] for a in statement["Action"]}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions  # no admin, no wildcard
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions


@pytest.mark.parametrize("shell", SHELLS)
def test_init_script_gives_each_key_the_policy_on_its_own_bucket(shell, tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "mc").write_text(FAKE_MC)
    (bin_dir / "mc").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MC_LOG": str(log), "TMPDIR": str(tmp_path)}
    for _ in range(2):  # the second run finds everything in place and must still succeed
        done = subprocess.run([shell, str(DEPLOY / "create-buckets.sh")], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    calls = (log / "calls").read_text().splitlines()
    assert "alias set local http://minio:9000 root root-secret" in calls
    assert {"mb --ignore-existing local/ml-artifacts", "mb --ignore-existing local/catalog-data"} <= set(calls)
    for name, key, secret, bucket in (("mlflow", "key-mlflow", "s-mlflow", "ml-artifacts"),
                                      ("pipeline", "key-pipeline", "s-pipeline", "catalog-data")):
        assert f"admin user add local {key} {secret}" in calls
        assert f"admin policy attach local cmaclip-{name} --user {key}" in calls
        policy = json.loads((log / f"cmaclip-{name}.json").read_text())
        assert _resources(policy) == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    # No key is ever given the other's policy, nor root's credentials to anyone but the alias.
    assert not [c for c in calls if "attach" in c and ("mlflow --user key-pipeline" in c or
                                                       "pipeline --user key-mlflow" in c)]
    assert sum("root-secret" in c for c in calls) == 2  # `alias set`, once per run
