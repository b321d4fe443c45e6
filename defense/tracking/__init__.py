"""MLflow tracking: runs and their parent (`tracker`), the repaired networks as MLflow models (`mlflow_model`,
with the self-contained model code `pyfunc_g`)."""
