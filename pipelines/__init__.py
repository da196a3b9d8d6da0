"""The Kubeflow pipeline that wires the stage components together, and its compile entry point."""
