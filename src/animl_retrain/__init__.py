"""Retrain Animl's camera-trap species classifier from human-validated labels.

The package holds the stage logic as plain functions (``animl_retrain.stages``); the KFP components
(``animl_retrain.components``) and the pipeline (``animl_retrain.pipelines``) are thin wrappers around it.
"""

__version__ = "0.1.0"
