"""HemaFlow data pipeline: S3 ingestion, validation, preprocessing, splits, local stack.

Importing this package is cheap: heavy libraries (TensorFlow, Great Expectations, boto3)
are imported inside the functions that need them.
"""
