"""Screening a batch of images: batch scoring, review queue, drift (issue 13)."""
