"""Layer 1, formats: the files the stages hand each other, their names (``layout``), schemas and readers.

Imports only :mod:`animl_retrain.core`.
"""
