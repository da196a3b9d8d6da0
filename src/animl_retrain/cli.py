"""``animl-retrain``: run the whole pipeline, one stage, or the embedded services, from a shell.

Stage subcommands take the same settings as the KFP components (their flags are generated from each stage's
configuration model); S3 and MLflow endpoints and credentials come from the environment
(``eval "$(animl-retrain services env)"`` points a shell at the embedded servers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from animl_retrain.config import add_config_arguments, config_from_args
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import configure_logging
from animl_retrain.tools import services

# subcommand -> (module under animl_retrain: a stage, or a tool that is not a pipeline step; config class; help)
STAGES = {
    "export": ("stages.export", "ExportConfig", "validate an Animl COCO export and apply the label spec"),
    "download": ("stages.download", "DownloadConfig", "download the full-size images the export needs"),
    "cct-to-md": ("stages.cct_to_md", "CctToMdConfig", "write ground-truth boxes as a MegaDetector results file"),
    "detect": ("stages.detect", "DetectConfig", "run MegaDetector (ONNX) on labelled images without a located box"),
    "crop": ("stages.crop", "CropConfig", "cut square crops around every box, resized once"),
    "split": ("stages.split", "SplitConfig", "split locations into train/val/test, balanced per class"),
    "train": ("stages.train", "TrainConfig", "train the classifier, logging to MLflow"),
    "evaluate": ("stages.evaluate", "EvaluateConfig", "score the model (and the champion) on the test split"),
    "register": ("stages.register", "RegisterConfig", "register the model in MLflow; move 'champion' if it wins"),
    "deploy": (
        "stages.deploy",
        "DeployConfig",
        "export, check and package the champion; deploy it to SageMaker for Animl",
    ),
    "pull-model": ("tools.pull_model", "PullModelConfig", "fetch a registered model from MLflow into a folder"),
    "predict": ("tools.predict", "PredictConfig", "classify the detections of a MegaDetector results file"),
}

DEMO_BUCKETS = {"images": "animl-images-serving-demo", "exports": "animl-demo-exports"}
DEMO_EXPORT = f"s3://{DEMO_BUCKETS['exports']}/demo_island/export.json"
DEMO_SPEC = f"s3://{DEMO_BUCKETS['exports']}/demo_island/label_spec.json"
DEMO_IMAGES = f"s3://{DEMO_BUCKETS['images']}"


def _stage_module(module: str):
    import importlib

    return importlib.import_module(f"animl_retrain.{module}")


def _use_embedded(state_dir: Path | None) -> services.Services:
    """Point this process (and the pipeline's subprocesses) at the running embedded servers."""
    import os

    svc = services.load(state_dir)
    os.environ.update(services.client_env(svc))
    return svc


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage with the flags given."""
    module_name, config_name, _ = STAGES[args.command]
    module = _stage_module(module_name)
    cfg = config_from_args(getattr(module, config_name), args)
    result = module.run(cfg)
    print(json.dumps(result.model_dump(), indent=2, default=str))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    """Start, stop or inspect the embedded servers."""
    if args.action == "start":
        svc = services.start(args.state_dir)
        print(f"S3 (SeaweedFS): {svc.s3_endpoint}\nMLflow:         {svc.mlflow_uri}\nstate folder:   {svc.state_dir}")
    elif args.action == "stop":
        stopped = services.stop(args.state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    elif args.action == "status":
        for name, pid in services.status(args.state_dir).items():
            print(f"{name:<10} {'running, pid ' + str(pid) if pid else 'stopped'}")
    elif args.action == "env":
        for key, value in services.client_env(services.load(args.state_dir)).items():
            print(f"export {key}={value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the demo project, unless it is already there."""
    from animl_retrain.core import storage
    from animl_retrain.tools import demo

    if args.embedded:
        svc = _use_embedded(args.state_dir)
        services.ensure_buckets(svc, list(DEMO_BUCKETS.values()))
        export_uri, images_uri, spec_uri = DEMO_EXPORT, DEMO_IMAGES, DEMO_SPEC
    else:
        if not (args.export_uri and args.images_uri and args.label_spec_uri):
            raise PipelineError("demo: give --embedded, or all of --export-uri, --images-uri and --label-spec-uri")
        export_uri, images_uri, spec_uri = args.export_uri, args.images_uri, args.label_spec_uri
    if not args.force:
        try:
            storage.read_bytes(export_uri, max_bytes=1 << 30)
            print(f"demo project already present at {export_uri} (use --force to write it again)")
            return 0
        except PipelineError:
            pass
    result = demo.generate(
        images_uri, export_uri, spec_uri, n_images=args.images, n_locations=args.locations, seed=args.seed
    )
    print(
        f"demo project: {result.images} images, {result.annotations} annotations at {result.locations} locations\n"
        f"  export:     {result.export_uri}\n  images:     {result.images_uri}\n  label spec: {result.label_spec_uri}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline locally and print the summary."""
    from animl_retrain.tools.local_run import format_summary, load_params, run_local

    params = load_params(args.params, args.set)
    mlflow_ui = None
    if args.embedded:
        mlflow_ui = _use_embedded(args.state_dir).mlflow_uri
    root = args.pipeline_root or services.default_state_dir() / "kfp"
    summary = run_local(params, root)
    print(format_summary(summary, mlflow_ui))
    if args.summary_json:
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the pipeline to YAML."""
    from animl_retrain.pipelines.retrain import COMPILED, compile_pipeline

    try:
        print(compile_pipeline(args.output or COMPILED, args.kfp_backend))
    except ValueError as e:
        raise PipelineError(str(e)) from e
    return 0


def cmd_kubeflow(args: argparse.Namespace) -> int:
    """Submit a run, schedule runs, or list runs on a Kubeflow Pipelines cluster."""
    from animl_retrain.tools import kubeflow
    from animl_retrain.tools.local_run import load_params

    conn = kubeflow.Connection(host=args.host, namespace=args.namespace, ui_url=args.ui_url)
    if args.command == "runs":
        runs = kubeflow.list_runs(conn, args.experiment or None, args.limit)
        sys.stdout.write(kubeflow.as_json(runs) + "\n" if args.json else kubeflow.format_runs(runs))
        return 0
    params = load_params(args.params, args.set)
    if args.command == "submit":
        result = kubeflow.submit(
            conn, params, args.experiment, args.run_name, args.service_account, kfp_backend=args.kfp_backend
        )
        print(kubeflow.as_json(result) if args.json else f"run {result['run_id']}: {result['url']}")
    else:
        result = kubeflow.schedule(
            conn, params, args.cron, args.name, args.experiment, args.service_account, kfp_backend=args.kfp_backend
        )
        print(
            kubeflow.as_json(result)
            if args.json
            else f"recurring run {result['recurring_run_id']} ({result['cron']}): {result['url']}"
        )
    return 0


def _add_kubeflow_arguments(p: argparse.ArgumentParser, params: bool = True) -> None:
    import os

    from animl_retrain.tools import kubeflow

    p.add_argument(
        "--host",
        default=os.environ.get("KF_PIPELINES_ENDPOINT", ""),
        help="Kubeflow Pipelines API URL, e.g. http://localhost:8080 (default: $KF_PIPELINES_ENDPOINT); "
        "a bearer token, if needed, comes from $KFP_TOKEN",
    )
    p.add_argument("--namespace", help="Kubeflow profile namespace (multi-user clusters)")
    p.add_argument("--ui-url", help="Kubeflow Pipelines UI URL for the printed links (default: --host)")
    p.add_argument(
        "--experiment",
        default=kubeflow.DEFAULT_EXPERIMENT,
        help=f"KFP experiment (default: {kubeflow.DEFAULT_EXPERIMENT})",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    if params:
        p.add_argument("--params", type=Path, help="YAML file of pipeline parameters (see examples/demo.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
        p.add_argument(
            "--service-account",
            default=kubeflow.DEFAULT_SERVICE_ACCOUNT,
            help=f"service account of the run's pods (default: {kubeflow.DEFAULT_SERVICE_ACCOUNT}, from manifests/; "
            "'' for Kubeflow's default)",
        )
        _add_backend_argument(p)
    p.set_defaults(func=cmd_kubeflow)


def _add_backend_argument(p: argparse.ArgumentParser) -> None:
    from animl_retrain.pipelines import backends

    p.add_argument(
        "--kfp-backend",
        default=backends.DEFAULT,
        metavar="X.Y",
        help=f"Kubeflow Pipelines backend version to compile for (default: {backends.DEFAULT}; one of "
        f"{', '.join(backends.BACKENDS)}; Kubeflow 1.10 ships 2.5, 1.11 ships 2.15, 26.03 ships 2.16). See "
        "docs/kubeflow.md for what each gets",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model folder over HTTP the way Animl calls a classifier, until interrupted."""
    from animl_retrain.serving.http import AnimlHandler, AnimlHTTPServer, load_classifier

    try:
        classifier = load_classifier(args.model, args.backend, args.threads)
    except (FileNotFoundError, ValueError) as e:
        raise PipelineError(f"serve: {e}") from e
    server = AnimlHTTPServer(AnimlHandler(classifier), args.host, args.port, args.max_request_bytes)
    print(f"serving {args.model} ({args.backend}) on {server.url}: POST /invocations, GET /ping", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="animl-retrain",
        description="Retrain Animl's camera-trap classifier: Animl export -> crops -> split -> train -> "
        "evaluate -> MLflow registry. `run` runs the whole Kubeflow pipeline on this machine; "
        "the stage subcommands run one step each.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_help = "state folder of the embedded services (default: $ANIML_STATE_DIR or ./.state)"

    p = sub.add_parser("run", help="run the whole pipeline locally (kfp.local) and print a summary")
    p.add_argument("--params", type=Path, help="YAML file of pipeline parameters (see examples/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one parameter")
    p.add_argument(
        "--embedded",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the embedded SeaweedFS and MLflow (default); --no-embedded uses the environment's",
    )
    p.add_argument("--state-dir", type=Path, help=state_help)
    p.add_argument("--pipeline-root", type=Path, help="where local artifacts go (default: STATE/kfp)")
    p.add_argument("--summary-json", type=Path, help="also write the summary as JSON here")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile the pipeline to Kubeflow IR YAML")
    p.add_argument("--output", type=Path, help="output file (default: pipelines/retrain.yaml)")
    _add_backend_argument(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="upload the pipeline to Kubeflow as a new version and start a run")
    _add_kubeflow_arguments(p)
    p.add_argument("--run-name", default="", help="run name in the Kubeflow UI (default: 'retrain DATE TIME')")

    p = sub.add_parser("schedule", help="upload the pipeline to Kubeflow and run it on a cron schedule")
    _add_kubeflow_arguments(p)
    p.add_argument(
        "--cron",
        default="0 0 3 * * 0",
        help="Kubeflow cron, 6 fields, seconds first (default: '0 0 3 * * 0', Sundays 03:00); "
        "missed runs are not caught up, one run at a time",
    )
    p.add_argument("--name", default="animl-retrain weekly", help="name of the recurring run")

    p = sub.add_parser("runs", help="list recent Kubeflow runs of this pipeline's experiment, with their state")
    _add_kubeflow_arguments(p, params=False)
    p.add_argument("--limit", type=int, default=10, help="how many runs (default: 10)")

    p = sub.add_parser("services", help="start, stop or inspect the embedded SeaweedFS and MLflow servers")
    p.add_argument(
        "action",
        choices=["start", "stop", "status", "env"],
        help="env prints shell exports that point clients at the servers",
    )
    p.add_argument("--state-dir", type=Path, help=state_help)
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("demo", help="write a synthetic, Animl-shaped demo project (export, images, label spec)")
    p.add_argument("--embedded", action="store_true", help="write it into the embedded S3 server")
    p.add_argument("--export-uri", help="where to write the export (s3:// or a path)")
    p.add_argument("--images-uri", help="where to write the images (s3://bucket[/prefix] or a folder)")
    p.add_argument("--label-spec-uri", help="where to write the label spec")
    p.add_argument("--images", type=int, default=480, help="number of images (default: 480)")
    p.add_argument("--locations", type=int, default=16, help="number of camera locations (default: 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--force", action="store_true", help="write it even if an export is already there")
    p.add_argument("--state-dir", type=Path, help=state_help)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="serve a model folder over HTTP the way Animl calls classifiers")
    p.add_argument("--model", type=Path, required=True, help="model folder (pull-model output or a deploy package)")
    p.add_argument("--backend", choices=["pytorch", "torchscript", "onnx"], default="pytorch", help="how to run it")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for inference (default: all)")
    p.add_argument("--max-request-bytes", type=int, default=0, help="largest request body (default: 16 MiB)")
    p.set_defaults(func=cmd_serve)

    for name, (module_name, config_name, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=_stage_module(module_name).__doc__.split("\n\n")[0])
        add_config_arguments(p, getattr(_stage_module(module_name), config_name))
        p.set_defaults(func=cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``animl-retrain`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
