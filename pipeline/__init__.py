"""Orchestration: the Kubeflow pipeline, the Prefect flow and run submission (DVC's is dvc.yaml)."""
