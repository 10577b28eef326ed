"""The lab screening workflow: batch scoring, the review queue and feedback into retraining."""
