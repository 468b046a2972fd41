#!/bin/sh
# Run by the `minio-init` service (minio/mc image) once MinIO is healthy, with MinIO's root credentials,
# which no other service holds. Creates the MLflow artifact bucket and the data bucket, and one key per
# S3 client, each with read/write on its own bucket and nothing else:
#   MINIO_MLFLOW_ACCESS_KEY    the MLflow server   MLFLOW_BUCKET   policy-mlflow.json
#   MINIO_PIPELINE_ACCESS_KEY  the Airflow workers DATA_BUCKET     policy-pipeline.json
# Idempotent, so `docker compose up` can run it on every start.
set -eu
HERE=$(dirname "$0")
PLACEHOLDER='${BUCKET}'

# The policy file $1 with every ${BUCKET} replaced by $2, on stdout. Plain sh: the mc image has no sed.
render() {
    while IFS= read -r line || [ -n "$line" ]; do
        while :; do
            case $line in
                *"$PLACEHOLDER"*) line=${line%%"$PLACEHOLDER"*}$2${line#*"$PLACEHOLDER"} ;;
                *) break ;;
            esac
        done
        printf '%s\n' "$line"
    done < "$1"
}

# Key $1 (secret $2) gets policy $3 (deploy/minio/policy-$3.json) on bucket $4.
grant() {
    policy="${TMPDIR:-/tmp}/cmaclip-$3.json"
    render "$HERE/policy-$3.json" "$4" > "$policy"
    mc admin policy create local "cmaclip-$3" "$policy"
    mc admin user add local "$1" "$2"
    # `attach` fails when the policy is attached already (minio/mc#4670): that is the state we want.
    if ! out=$(mc admin policy attach local "cmaclip-$3" --user "$1" 2>&1); then
        case $out in
            *"already in effect"*) ;;
            *) echo "$out" >&2; exit 1 ;;
        esac
    fi
}

mc alias set local "http://minio:9000" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing "local/$MLFLOW_BUCKET"
mc mb --ignore-existing "local/$DATA_BUCKET"
grant "$MINIO_MLFLOW_ACCESS_KEY" "$MINIO_MLFLOW_SECRET_KEY" mlflow "$MLFLOW_BUCKET"
grant "$MINIO_PIPELINE_ACCESS_KEY" "$MINIO_PIPELINE_SECRET_KEY" pipeline "$DATA_BUCKET"
echo "buckets ready: $MLFLOW_BUCKET (key $MINIO_MLFLOW_ACCESS_KEY), $DATA_BUCKET (key $MINIO_PIPELINE_ACCESS_KEY)"
