"""Batch screening: submit a folder to the inbox, score it with the @champion bundle, write a ranked report.

Storage layout and row formats: contracts/screening.py. DAG: dags/hemaflow_score.py.
"""
