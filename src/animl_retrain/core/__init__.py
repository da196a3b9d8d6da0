"""Layer 0, core: errors, logging, atomic files and the JSON reader, value checks, the stage report, storage.

Imports nothing else of the package, so every other layer can use it.
"""
