"""Layer 2, vision: opening images safely and the crop rule that turns a detection into model input.

PIL and numpy only: no torch, so the CPU image's stages use it.
"""
