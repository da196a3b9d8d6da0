"""Kubeflow Pipelines API, as seen from inside a pipeline task."""
