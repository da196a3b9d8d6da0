"""Layer 6, tools: what developers and operators run besides the stages.

predict, pull-model, the demo project, the embedded services, the local run and the Kubeflow client.
"""
