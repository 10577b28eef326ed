"""HemaFlow operations: the local stack and its process supervision, Airflow as deployed, MLflow's
users, serving notification, the run report and the DAG defaults. Imports contracts and pipeline;
nothing but entry points (dags, scripts, `__main__` modules, tests) imports ops."""
