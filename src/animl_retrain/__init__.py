"""Retrain Animl's camera-trap species classifier from human-validated labels.

The package is in layers (``docs/architecture.md``): core, formats, vision, modeling, serving, integrations, and on
top the pipeline's stages as plain functions (``animl_retrain.stages``) and the developer tools. The KFP components
and the pipeline live in the repository's ``components/`` and ``pipelines/`` folders, installed as
``animl_retrain.components`` and ``animl_retrain.pipelines``: thin wrappers around the stages.
"""

__version__ = "0.1.0"
