"""Pipeline steps: one importable function per step, shared by DVC, Kubeflow and Prefect."""
