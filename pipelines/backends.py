"""Which Kubeflow Pipelines backend accepts what: the compatibility matrix the compiled pipeline follows.

One compiled file cannot serve every backend people run, so ``animl-retrain compile --kfp-backend X.Y`` (and
``submit``, ``schedule``) compiles the variant that backend accepts. Each feature below names the backend
source that decides it (kubeflow/pipelines at the release tag; ``tests/test_kfp_backends.py`` encodes them):

- **final status** (the exit handler's ``PipelineTaskFinalStatus`` input): up to 2.5 the Argo compiler refuses
  it, "task final status not supported yet" (``backend/src/v2/compiler/argocompiler/dag.go`` at 2.2.0, 2.4.0,
  2.5.0); 2.14.0 resolves it in the driver. Without it, the status step asks the KFP API for the run's state.
- **optional env** (``optional`` on Secret and ConfigMap env): the Argo compiler parses each task's Kubernetes
  config strictly from 2.14.0 (``protojson.Unmarshal`` in ``argocompiler/container.go``), and
  ``SecretAsEnv.optional`` exists only from 2.15.0 (``kubernetes_platform/proto/kubernetes_executor_config.proto``),
  so 2.14 refuses the field. Up to 2.5 the field is ignored (lenient ``jsonpb`` there): every Secret and key the
  pipeline names must then exist, or the pod stays in CreateContainerConfigError.
- **security context** (``securityContext`` of a task): in that proto from 2.16.0 (``security_context = 18``);
  2.14 and 2.15 refuse it in the same strict parse, up to 2.5 it is ignored.

- **artifact OneOf** (``dsl.OneOf`` over artifacts of mutually exclusive branches): 2.17.0's driver picks the
  branch that completed (``GetProducerTask`` in ``backend/src/v2/driver/resolve.go``, "resolve artifact OneOf outputs
  at runtime", #13436); 2.14.0-2.16.0 take the *last* selector whichever branch ran (same function), and 2.4.0/2.5.0
  loop over the selectors keeping the last (``resolveUpstreamArtifacts`` in ``driver/driver.go``), so the consumer
  would read a branch that never ran. With it, detect is not scheduled without detector weights (a CPU step writes
  the empty results file instead); without it, detect runs and does nothing. kfp.local (SDK 2.17.0,
  ``kfp/local/orchestrator/orchestrator_utils.py``) refuses an artifact OneOf ("Expected 1 artifact in
  ArtifactSelectorSpec"), so the default variant, which ``make run`` runs, must not use it.

There are no backend releases 2.6 to 2.13. Kubeflow ships: 1.9 with 2.2/2.3, 1.10 with 2.4.1/2.5.0, 1.11 with
2.15.0, 26.03 with 2.16.0 (kubeflow/manifests README at those tags).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT = "2.16"  # standalone KFP and Kubeflow 26.03; pipelines/retrain.yaml is compiled for it, kfp.local runs it


@dataclass(frozen=True)
class Backend:
    """What one KFP backend release accepts in a compiled pipeline."""

    version: str
    final_status: bool
    optional_env: bool
    security_context: bool
    artifact_one_of: bool = False


BACKENDS = {
    b.version: b
    for b in (
        Backend("2.4", final_status=False, optional_env=False, security_context=False),
        Backend("2.5", final_status=False, optional_env=False, security_context=False),
        Backend("2.14", final_status=True, optional_env=False, security_context=False),
        Backend("2.15", final_status=True, optional_env=True, security_context=False),
        Backend("2.16", final_status=True, optional_env=True, security_context=True),
        Backend("2.17", final_status=True, optional_env=True, security_context=True, artifact_one_of=True),
    )
}
# What each Kubeflow release ships (kubeflow/manifests), for --kfp-backend's help and the docs.
KUBEFLOW = {"1.10": "2.5", "1.11": "2.15", "26.03": "2.16"}

_current = [BACKENDS[DEFAULT]]


def backend(version: str) -> Backend:
    """The backend ``version`` (X.Y, or X.Y.Z whose patch is ignored); a clear error for any other."""
    text = str(version).strip()
    parts = text.split(".")
    key = ".".join(parts[:2])
    if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts) or key not in BACKENDS:
        known = ", ".join(BACKENDS)
        raise ValueError(
            f"--kfp-backend {text!r}: expected one of {known} (there are no KFP backend releases 2.6 to 2.13; "
            f"Kubeflow 1.10 ships 2.5, 1.11 ships 2.15, 26.03 ships 2.16)"
        )
    return BACKENDS[key]


def current() -> Backend:
    """The backend the pipeline is being compiled for."""
    return _current[-1]


@contextlib.contextmanager
def targeting(target: Backend) -> Iterator[Backend]:
    """Compile for ``target`` inside this block (``stage`` and the pipeline read :func:`current`)."""
    _current.append(target)
    try:
        yield target
    finally:
        _current.pop()


def strip_unsupported(platform_doc: dict, target: Backend) -> dict:
    """Drop from the compiled Kubernetes config what ``target`` cannot parse (kfp-kubernetes always writes them)."""
    executors = platform_doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    for config in executors.values():
        if not target.optional_env:
            for entry in (*config.get("secretAsEnv", []), *config.get("configMapAsEnv", [])):
                entry.pop("optional", None)
        if not target.security_context:
            config.pop("securityContext", None)
    return platform_doc
