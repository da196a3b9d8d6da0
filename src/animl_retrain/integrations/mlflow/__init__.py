"""MLflow: the tracking server, training runs, the model registry (the one champion lookup) and the pyfunc model."""
