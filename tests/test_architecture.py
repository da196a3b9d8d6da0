"""The package's layers and import rules (docs/architecture.md), checked on the source with ``ast``.

Every import counts, at module level or inside a function: a function-level ``import torch`` is still torch.
"""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "animl_retrain"
# The layers, lowest first: each imports only the layers before it (and itself).
LAYERS = ("core", "formats", "vision", "modeling", "serving", "integrations")
# The only homes of the heavy ML packages: the CPU image has neither, and light stages must run there.
HEAVY = ("torch", "torchvision", "mlflow")
HEAVY_HOMES = ("modeling", "integrations", "serving")


def module_name(path: Path) -> str:
    if path.is_relative_to(PACKAGE):
        parts = ("animl_retrain", *path.relative_to(PACKAGE).with_suffix("").parts)
    else:  # components/ and pipelines/ are installed as animl_retrain.components and animl_retrain.pipelines
        parts = ("animl_retrain", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(p for p in parts if p != "__init__")


SOURCES = {
    module_name(p): p
    for p in [*PACKAGE.rglob("*.py"), *(ROOT / "components").glob("*.py"), *(ROOT / "pipelines").glob("*.py")]
}


def imported(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (``from a import b`` counts as ``a.b`` when that is a module), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full if full in SOURCES else node.module, node.lineno))
    return out


def layer(module: str) -> str:
    """'core', 'stages', ... for a package module; 'top' for cli, config and the mlflow_model re-export."""
    parts = module.split(".")
    folders = (*LAYERS, "stages", "tools", "components", "pipelines")
    return parts[1] if len(parts) > 1 and parts[1] in folders else "top"


def package_imports(module: str) -> list[tuple[str, int]]:
    return [
        (m, line) for m, line in imported(SOURCES[module]) if m == "animl_retrain" or m.startswith("animl_retrain.")
    ]


def where(module: str, line: int) -> str:
    return f"{SOURCES[module].relative_to(ROOT)}:{line}"


@pytest.mark.parametrize("name", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(name):
    allowed = set(LAYERS[: LAYERS.index(name) + 1])
    wrong = [
        f"{where(m, line)} imports {target}"
        for m in SOURCES
        if layer(m) == name
        for target, line in package_imports(m)
        if target != "animl_retrain" and layer(target) not in allowed
    ]
    assert not wrong, f"{name}/ may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_the_package_root_imports_nothing():
    """``import animl_retrain`` (to find the package folder) then pulls in no layer."""
    assert imported(SOURCES["animl_retrain"]) == []


def test_core_imports_nothing_of_the_package_and_formats_only_core():
    for name, allowed in (("core", {"core"}), ("formats", {"core", "formats"})):
        wrong = [
            f"{where(m, line)} imports {target}"
            for m in SOURCES
            if layer(m) == name
            for target, line in package_imports(m)
            if layer(target) not in allowed
        ]
        assert not wrong, "\n".join(wrong)


def test_a_stage_never_imports_another_stage_or_a_tool():
    wrong = [
        f"{where(m, line)} imports {target}"
        for m in SOURCES
        if layer(m) == "stages"
        for target, line in package_imports(m)
        if (layer(target) == "stages" and target not in (m, "animl_retrain.stages"))
        or (layer(target) in ("tools", "top") and target != "animl_retrain.config")
    ]
    assert not wrong, "what stages hand each other is named in formats/layout.py:\n" + "\n".join(wrong)


def test_config_imports_only_core():
    wrong = [target for target, _ in package_imports("animl_retrain.config") if layer(target) != "core"]
    assert not wrong


def test_torch_and_mlflow_are_imported_only_under_modeling_integrations_and_serving():
    wrong = [
        f"{where(m, line)} imports {target}"
        for m, path in SOURCES.items()
        if layer(m) not in HEAVY_HOMES
        for target, line in imported(path)
        if target.split(".")[0] in HEAVY
    ]
    assert not wrong, "torch and mlflow belong in modeling/, integrations/ or serving/:\n" + "\n".join(wrong)


def test_the_rules_see_function_level_imports():
    """The checks above would catch a lazy import: the serving module's torch import sits inside a function."""
    inside = [line for target, line in imported(SOURCES["animl_retrain.serving.http"]) if target == "torch"]
    assert inside and "import torch" in SOURCES["animl_retrain.serving.http"].read_text().splitlines()[inside[0] - 1]


def test_every_package_folder_is_installed():
    """A non-editable install (the images) gets only the packages pyproject lists: it must list every folder."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("*.py")}
    assert folders | {"animl_retrain.components", "animl_retrain.pipelines"} == listed
    assert all((Path(p) / "__init__.py").is_file() for p in {q.parent for q in PACKAGE.rglob("*.py")})


def test_each_layer_says_what_it_holds():
    for name in (*LAYERS, "stages", "tools"):
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), name


def test_the_old_path_of_the_mlflow_model_is_kept_for_registered_champions():
    """Registered versions' code files import animl_retrain.mlflow_model (tests/test_serving.py loads one)."""
    from animl_retrain import mlflow_model
    from animl_retrain.integrations.mlflow import pyfunc

    assert mlflow_model.AnimlClassifierModel is pyfunc.AnimlClassifierModel
