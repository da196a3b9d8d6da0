"""Kept for registered models: champions logged before the package had layers import their class from here.

A registered version's code file (its ``python_model``, stored in the registry with it) runs
``from animl_retrain.mlflow_model import AnimlClassifierModel``. In a process that already imported this package
(the evaluate stage scoring the champion) that resolves to the installed package, so this path must keep working
for as long as such versions may be loaded. The model itself is :mod:`animl_retrain.integrations.mlflow.pyfunc`.
"""

from animl_retrain.integrations.mlflow.pyfunc import ARTIFACT_PATH, AnimlClassifierModel, example_input, log_model

__all__ = ["ARTIFACT_PATH", "AnimlClassifierModel", "example_input", "log_model"]
