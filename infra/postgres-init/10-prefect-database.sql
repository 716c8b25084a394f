-- Runs once, when the postgres volume is initialised: the Prefect server's database, owned by
-- POSTGRES_USER (the MLflow database is POSTGRES_DB, created by the image itself).
CREATE DATABASE prefect;
