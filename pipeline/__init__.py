"""The batch pipeline around the CMA-CLIP model, one sub-package per part of the flow: `io` (storage,
catalogs, images, text, Parquet, SQL) -> `ingest` -> `training` -> `tracking` (MLflow runs, pyfunc, registry)
-> `scoring` -> `orchestration` (what the Airflow tasks run). What they share sits here: `settings`,
`contracts` (output columns), `manifests`, `reasons` (quarantine codes), the `cli`, the `demo` and the
`synthetic` catalog. Nothing is imported here, so the DAG files stay free of torch and mlflow."""
