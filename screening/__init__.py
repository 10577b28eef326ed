"""The lab's screening workflow: submit a folder to the inbox, score it with the @champion bundle,
write a ranked report; reviewers' decisions flow back into raw/ (feedback).

Storage layout and row formats: contracts/screening.py. DAGs: dags/hemaflow_score.py, dags/hemaflow_feedback.py.
"""
