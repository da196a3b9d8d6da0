"""Layer 5, integrations: the outside services: Animl's API, MLflow, AWS (SageMaker, TorchServe packaging)."""
