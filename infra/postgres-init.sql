-- Extra roles and databases on the shared Postgres (run once, on the first start of an empty
-- data volume): Optuna's RDB storage and MLflow's backend + auth stores, each with its own role.
-- No password is written here: they come from the postgres container's environment
-- (ASRFLOW_OPTUNA_DB_PASSWORD, ASRFLOW_MLFLOW_DB_PASSWORD; psql's \getenv, psql 15+), and the
-- script stops with an error when one is missing.
\set ON_ERROR_STOP on
\getenv optuna_password ASRFLOW_OPTUNA_DB_PASSWORD
\getenv mlflow_password ASRFLOW_MLFLOW_DB_PASSWORD
SELECT :{?optuna_password} AND :{?mlflow_password} AS have_passwords \gset
\if :have_passwords
\else
  DO $$ BEGIN RAISE EXCEPTION 'set ASRFLOW_OPTUNA_DB_PASSWORD and ASRFLOW_MLFLOW_DB_PASSWORD for the postgres service'; END $$;
\endif
CREATE ROLE asrflow LOGIN PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER asrflow;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
