"""AWS: SageMaker serverless endpoints and SSM parameters, and the TorchServe archive they serve."""
