"""KFP components: one thin wrapper per stage, declaring only inputs, outputs and image.

Each component is a *lightweight* Python component whose ``base_image`` already holds this package and kfp,
declared with ``install_kfp_package=False`` and no ``packages_to_install``. That one form serves both worlds:
on Kubernetes the pod runs our image with nothing installed at start, and locally kfp's SubprocessRunner, which
refuses container components and ``target_image``, runs the same definition in this virtualenv. The body only
imports the stage from the installed package and hands it the artifact paths.

This folder is installed as ``animl_retrain.components`` (pyproject.toml maps it; ``docs/architecture.md``): the
component bodies in the compiled pipeline import it by that name, so import it by that name everywhere.
"""

from animl_retrain.components.container_images import CPU_IMAGE, ML_IMAGE

__all__ = ["CPU_IMAGE", "ML_IMAGE"]
