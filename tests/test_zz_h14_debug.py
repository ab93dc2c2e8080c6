import os, mlflow
def test_zz_debug():
    print("ENV", os.environ.get("MLFLOW_TRACKING_URI"), "GET", mlflow.get_tracking_uri(), "EXP", os.environ.get("MLFLOW_EXPERIMENT_ID"), os.environ.get("MLFLOW_EXPERIMENT_NAME"))
    from mlflow.tracking.fluent import _active_experiment_id
    print("ACTIVE", _active_experiment_id)
