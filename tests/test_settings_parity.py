"""Settings stay in step: every component default and every pipeline default equals the config field it feeds.

A setting is written in its stage's config (the source of truth: the CLI's flags are generated from it), in the
KFP component that runs the stage and in the pipeline's signature. These tests follow each value from the
pipeline through the component into the config, by reading the calls in their source, and compare the defaults.
Where they differ on purpose the pair is listed in EXCEPTIONS with the reason; a listed pair that has come back
into step fails too, so the list cannot rot.
"""

import ast
import importlib
import inspect
import re
import textwrap
import typing

from animl_retrain.pipelines.retrain import retrain_pipeline

COMPONENTS = [
    "cct_to_md",
    "crop",
    "deploy",
    "detect",
    "download",
    "evaluate",
    "export",
    "register",
    "split",
    "status",
    "status_api",
    "train",
]
EMPTY = inspect.Parameter.empty
# (where the default is written, the parameter, what it feeds) -> why the two defaults differ.
EXCEPTIONS = {
    ("retrain_pipeline", "model_name", "export_op.model_name"): (
        "the export stage compares with no champion unless told; the pipeline always names its model"
    ),
    ("retrain_pipeline", "model_name", "evaluate_op.registered_name"): (
        "evaluate scores no champion unless told; the pipeline always names its model"
    ),
    ("train_op", "gpus", "TrainConfig.device"): "a GPU count on the cluster; the stage takes 'cpu' for 0, else 'auto'",
    ("retrain_pipeline", "deploy", None): "a condition of the pipeline (dsl.If), not a stage setting",
}


def component(name: str):
    module = importlib.import_module(f"animl_retrain.components.{name}")
    ops = {k: v for k, v in vars(module).items() if k.endswith("_op")}
    return ops[f"{name}_op"] if len(ops) > 1 else next(iter(ops.values()))  # detect's module also has its stand-in


def function_source(func) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(func))).body[0]


def component_feeds(op) -> tuple[type, dict[str, str]]:
    """The config class a component builds and {component parameter: config field} for every direct pass."""
    tree = function_source(op.python_func)
    modules = {
        alias.asname or alias.name: f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "animl_retrain.stages"
        for alias in node.names
    }
    [call] = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_stage"]
    config_ref = call.args[1]
    config = getattr(importlib.import_module(modules[config_ref.value.id]), config_ref.attr)
    params = set(inspect.signature(op.python_func).parameters)
    feeds = {kw.value.id: kw.arg for kw in call.keywords if isinstance(kw.value, ast.Name) and kw.value.id in params}
    return config, feeds


def pipeline_feeds() -> list[tuple[str, str, str]]:
    """(pipeline parameter, component, component parameter) for every pipeline parameter passed to a component."""
    params = set(inspect.signature(retrain_pipeline.pipeline_func).parameters)
    tree = function_source(retrain_pipeline.pipeline_func)
    # Arguments gathered once for a component called in several branches: `args = dict(...)`, then `op(**args)`.
    bundles = {
        node.targets[0].id: node.value.keywords
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", "") == "dict"
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "").endswith("_op"):
            for kw in node.keywords:
                passed = bundles.get(kw.value.id, []) if kw.arg is None and isinstance(kw.value, ast.Name) else [kw]
                out += [
                    (k.value.id, node.func.id, k.arg)
                    for k in passed
                    if isinstance(k.value, ast.Name) and k.value.id in params
                ]
    return sorted(set(out))


def field_default(config: type, name: str):
    field = config.model_fields[name]
    return EMPTY if field.is_required() else field.default


OPS = {component(name).name.replace("-", "_"): component(name) for name in COMPONENTS}


def mismatches() -> dict[tuple, str]:
    """Every pair of defaults that differ: (where, parameter, what it feeds) -> 'theirs vs ours'."""
    found = {}
    for op_name, op in OPS.items():
        config, feeds = component_feeds(op)
        for param, p in inspect.signature(op.python_func).parameters.items():
            if p.default is EMPTY:
                continue
            if param not in feeds:
                found[(op_name, param, f"{config.__name__}.device" if param == "gpus" else None)] = "feeds no field"
            elif p.default != field_default(config, feeds[param]):
                found[(op_name, param, f"{config.__name__}.{feeds[param]}")] = (
                    f"{p.default!r} vs {field_default(config, feeds[param])!r}"
                )
    signature = inspect.signature(retrain_pipeline.pipeline_func).parameters
    fed = pipeline_feeds()
    for param, p in signature.items():
        targets = [(op, arg) for name, op, arg in fed if name == param]
        if not targets:
            found[("retrain_pipeline", param, None)] = "feeds no component"
        for op, arg in targets:
            theirs = inspect.signature(OPS[op].python_func).parameters[arg].default
            if theirs is EMPTY:  # a required component input: compare with the config field behind it
                config, feeds = component_feeds(OPS[op])
                theirs = field_default(config, feeds[arg]) if arg in feeds else EMPTY
            if p.default != theirs:
                found[("retrain_pipeline", param, f"{op}.{arg}")] = f"{p.default!r} vs {theirs!r}"
    return found


def test_component_and_pipeline_defaults_equal_the_config_fields_they_feed():
    found = mismatches()
    unexplained = {k: v for k, v in found.items() if k not in EXCEPTIONS}
    assert not unexplained, "defaults out of step (fix one side, or list the pair with a reason):\n" + "\n".join(
        f"{k}: {v}" for k, v in unexplained.items()
    )
    stale = [k for k in EXCEPTIONS if k not in found]
    assert not stale, f"listed exceptions that are in step again (remove them): {stale}"


def test_every_component_parameter_reaches_its_stage():
    """Nothing a component declares is silently dropped: each parameter feeds a field (or is an exception)."""
    for op_name, op in OPS.items():
        config, feeds = component_feeds(op)
        assert set(feeds.values()) <= set(config.model_fields), op_name
        for param, p in inspect.signature(op.python_func).parameters.items():
            is_artifact = (
                "Input" in str(p.annotation)
                or "Output" in str(p.annotation)
                or "PipelineTaskFinalStatus" in str(p.annotation)
            )
            if not is_artifact and param not in feeds:
                assert (op_name, param, f"{config.__name__}.device") in EXCEPTIONS, f"{op_name}.{param} feeds nothing"


def docstring_args() -> dict[str, str]:
    doc = inspect.getdoc(retrain_pipeline.pipeline_func)
    block = doc.split("Args:\n", 1)[1]
    entries = re.split(r"\n    (?=\w+: )", "\n" + textwrap.dedent(block).replace("\n", "\n    "))
    out = {}
    for entry in entries:
        name, sep, text = entry.strip().partition(": ")
        if sep:
            out[name] = " ".join(text.split())
    return out


def test_the_pipeline_docstring_documents_every_parameter_and_its_choices():
    """Each parameter has an Args entry (the Kubeflow UI shows it); where a field has choices, the entry names them."""
    args = docstring_args()
    params = list(inspect.signature(retrain_pipeline.pipeline_func).parameters)
    assert list(args) == params
    for param, op, arg in pipeline_feeds():
        config, feeds = component_feeds(OPS[op])
        if arg not in feeds:
            continue
        annotation = config.model_fields[feeds[arg]].annotation
        if typing.get_origin(annotation) is typing.Literal:
            named = set(re.findall(r"'([^']+)'", args[param]))
            assert set(typing.get_args(annotation)) <= named, f"{param}: {args[param]!r} must name every choice"
