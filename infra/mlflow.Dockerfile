# MLflow tracking server: Postgres backend store, artifacts proxied to S3 (MinIO), basic-auth users.
# mlflow, flask-wtf (its auth extra) and boto3 are the versions pinned in requirements.lock.
FROM python:3.11.13-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" flask-wtf==1.3.0 psycopg2-binary==2.9.10 boto3==1.43.117 \
 && useradd --create-home --uid 1000 mlflow \
 && mkdir -p /var/lib/mlflow-auth && chown mlflow /var/lib/mlflow-auth

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
