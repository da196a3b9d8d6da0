"""One module per benchmarked stage; each has ``STAGE`` and ``run(ctx) -> list[Row]``."""
