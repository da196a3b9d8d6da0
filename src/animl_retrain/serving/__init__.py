"""Layer 4, serving: a model folder answering Animl's classifier requests (HTTP, TorchServe), and its export.

Shipped inside the TorchServe archive: modules here import torch only when a model loads.
"""
