"""MLflow "models from code" entry point of the registered model: MLflow runs this file to build the model.

Logging the model from a file (instead of pickling a Python object) keeps arbitrary pickled code out of the
registry; the model's behaviour lives in :mod:`animl_retrain.integrations.mlflow.pyfunc`, shipped in the model's
``code/``. Versions registered before the package had layers import it as ``animl_retrain.mlflow_model``.
"""

import mlflow

from animl_retrain.integrations.mlflow.pyfunc import AnimlClassifierModel

mlflow.models.set_model(AnimlClassifierModel())
