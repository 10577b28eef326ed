"""HemaFlow training: CNN, evaluation, MLflow tracking, serving bundle and promotion gate."""
