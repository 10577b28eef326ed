"""HemaFlow's shared kernel: what every package agrees on.

Settings, image decoding and THE preprocessing function, dataset specs, the processed-dataset
format, the serving-bundle format and small pure helpers. Importing any module here never pulls
in TensorFlow, MLflow, boto3 or Airflow (tests/unit/test_contracts.py proves it); the few
functions that need a heavy library import it inside the function.
"""
