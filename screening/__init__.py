"""The lab screening workflow: batch scoring, the review queue, feedback into retraining, drift."""
