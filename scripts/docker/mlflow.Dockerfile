# MLflow tracking server for docker-compose: Postgres backend, artifacts proxied to the S3 bucket.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install mlflow==3.17.2 boto3==1.44.5 psycopg2-binary==2.9.13 \
    && useradd --create-home --uid 50001 mlflow
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
