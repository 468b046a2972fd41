#!/usr/bin/env bash
# One-shot set-up run by the `airflow-init` service before any other Airflow component starts:
# migrate the metadata DB, create the `gpu` pool (pipeline.orchestration.airflow_home owns its size), and give the
# admin user the password from .env (SimpleAuthManager reads users from config, passwords from a file).
set -euo pipefail

python -m pipeline.orchestration.airflow_home

passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"
mkdir -p "$(dirname "$passwords_file")"
python - "$passwords_file" <<'PY'
import json, os, sys
# Written via a temporary name so the api-server never reads half a file.
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    json.dump({os.environ["AIRFLOW_ADMIN_USER"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
os.chmod(path + ".tmp", 0o600)
os.replace(path + ".tmp", path)
PY
echo "Airflow metadata DB migrated; admin user '${AIRFLOW_ADMIN_USER}' configured."
