"""Layer 3, modeling: networks and tensors: backbones, checkpoints, data loading, training, inference, metrics.

The only layer (with integrations and serving) that imports torch.
"""
