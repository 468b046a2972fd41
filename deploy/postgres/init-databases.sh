#!/usr/bin/env bash
# Runs once, when the postgres container initialises an empty data volume (/docker-entrypoint-initdb.d):
# one role and one database each for the Airflow metadata and the MLflow backend store, so neither
# service can touch the other's tables and each can be backed up or moved on its own.
set -euo pipefail

create() {  # role password database
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -v role="$1" -v password="$2" -v db="$3" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role";
SQL
}

create "$AIRFLOW_DB_USER" "$AIRFLOW_DB_PASSWORD" "$AIRFLOW_DB_NAME"
create "$MLFLOW_DB_USER" "$MLFLOW_DB_PASSWORD" "$MLFLOW_DB_NAME"
