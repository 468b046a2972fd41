"""What the Airflow DAGs in dags/ run: one function per task (`airflow_tasks`), and the embedded Airflow
environment (`airflow_home`). Torch- and mlflow-free at import: the DAG processor imports it."""
