# MLflow tracking server for docker-compose: Postgres backend, artifacts proxied to the S3 bucket,
# MLflow's basic-auth app (Flask-WTF is its CSRF dependency). The auth user store is SQLite on the
# mlflow-auth volume; its folder is created here, owned by the server's user, so the named volume
# starts with that ownership (a volume over a missing folder would be root-owned).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini
RUN pip install mlflow==3.17.2 boto3==1.44.5 psycopg2-binary==2.9.13 Flask-WTF==1.3.0 \
    && useradd --create-home --uid 50001 mlflow \
    && mkdir -p /var/lib/mlflow-auth /etc/mlflow && chown mlflow /var/lib/mlflow-auth
COPY scripts/docker/mlflow-basic-auth.ini /etc/mlflow/basic_auth.ini
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
