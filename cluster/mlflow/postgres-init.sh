#!/bin/sh
# Roles and databases of the team server, created by a PostgreSQL superuser. Safe to run again:
# existing roles get their password reset, existing databases are left as they are.
#
#   mlflow  owns  mlflow       (MLflow tracking: experiments, runs, metrics, params, registry)
#           and   mlflow_auth  (MLflow basic-auth: users and permissions)
#   optuna  owns  optuna       (Optuna RDB storage, for studies with `optuna.storage: postgresql://...`)
#
# Passwords come from MLFLOW_DB_PASSWORD and OPTUNA_DB_PASSWORD. The connection is libpq's usual
# environment (PGHOST, PGPORT, PGUSER, PGPASSWORD); inside the official postgres image this file
# runs from /docker-entrypoint-initdb.d/ as the superuser over the local socket, on first start only.
set -eu
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
: "${OPTUNA_DB_PASSWORD:?OPTUNA_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
     --username "${PGUSER:-${POSTGRES_USER:-postgres}}" --dbname postgres <<'SQL'
\getenv mlflow_pw MLFLOW_DB_PASSWORD
\getenv optuna_pw OPTUNA_DB_PASSWORD
SELECT 'CREATE ROLE mlflow LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlflow') \gexec
SELECT 'CREATE ROLE optuna LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'optuna') \gexec
ALTER ROLE mlflow WITH LOGIN PASSWORD :'mlflow_pw';
ALTER ROLE optuna WITH LOGIN PASSWORD :'optuna_pw';
SELECT 'CREATE DATABASE mlflow OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow') \gexec
SELECT 'CREATE DATABASE mlflow_auth OWNER mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow_auth') \gexec
SELECT 'CREATE DATABASE optuna OWNER optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna') \gexec
REVOKE ALL ON DATABASE mlflow, mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
SQL
echo "postgres-init.sh: roles mlflow, optuna and databases mlflow, mlflow_auth, optuna are ready"
