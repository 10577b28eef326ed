"""HemaFlow serving: a small FastAPI container that runs the champion model's TFLite bundle."""
