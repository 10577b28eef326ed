# Airflow 3 image for docker-compose: the project's pinned lock plus what a Celery + Postgres
# deployment needs. The DAGs and the packages their tasks call (contracts, pipeline, training, ops;
# not serving, which runs in its own image) are copied in; every Airflow component
# (api-server, scheduler, dag-processor, triggerer, celery workers) runs from this image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow HEMAFLOW_HOME=/opt/hemaflow/state PYTHONPATH=/opt/hemaflow

RUN apt-get update && apt-get install -y --no-install-recommends tini curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 50000 airflow

WORKDIR /opt/hemaflow
COPY requirements.txt .
RUN pip install -r requirements.txt \
        apache-airflow-providers-celery==3.26.0 celery==5.7.0 redis==8.1.0 psycopg2-binary==2.9.13

COPY contracts/ contracts/
COPY pipeline/ pipeline/
COPY training/ training/
COPY ops/ ops/
COPY screening/ screening/
COPY dags/ dags/
# Every named-volume mount point exists in the image, owned by uid 50000: Docker initialises a new
# named volume from the image folder (ownership included), so logs and passwords are writable.
RUN mkdir -p /opt/airflow/logs /opt/airflow/passwords /opt/hemaflow/state \
    && chown -R airflow /opt/airflow /opt/hemaflow/state

USER airflow
ENTRYPOINT ["tini", "--", "airflow"]
CMD ["version"]
