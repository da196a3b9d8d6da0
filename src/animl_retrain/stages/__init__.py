"""Layer 6, stages: one module per pipeline stage, each a typed config, a result and ``run(cfg)``.

A stage never imports another stage; what stages hand each other is named in :mod:`animl_retrain.formats.layout`.
"""
