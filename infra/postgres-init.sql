-- Extra databases on the shared Postgres: MLflow's backend store and Optuna's RDB storage.
CREATE DATABASE mlflow OWNER airflow;
CREATE USER asrflow WITH PASSWORD 'asrflow';
CREATE DATABASE optuna OWNER asrflow;
