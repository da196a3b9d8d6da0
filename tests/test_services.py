import json
import time

import pytest

from animl_retrain.core.errors import PipelineError
from animl_retrain.tools import services

pytestmark = pytest.mark.server


def test_start_is_idempotent_and_status_knows_the_pids(servers):
    start = time.monotonic()
    again = services.start(servers.state_dir)
    assert time.monotonic() - start < 5
    assert again == servers
    pids = services.status(servers.state_dir)
    assert all(pids.values())


def test_load_and_stop_without_servers(tmp_path):
    with pytest.raises(PipelineError, match="not running"):
        services.load(tmp_path)
    assert services.stop(tmp_path) == []


def test_a_port_taken_while_stopped_moves_the_server_and_keeps_the_data(tmp_path):
    import dataclasses
    import socket

    svc = services.start(tmp_path, mlflow=False)
    try:
        assert svc.s3_port != services.PREFERRED["s3"]  # only `make run`'s own state takes the well-known ports
        services.s3_admin_client(svc).put_object(Bucket=services.MLFLOW_BUCKET, Key="kept", Body=b"data")
        services.stop(tmp_path)
        with socket.socket() as squatter:
            # Another program now listens on the recorded S3 port. (Taking the server's own port back right after
            # it stopped races with any connect() on the machine picking that ephemeral port, so the record is
            # pointed at a port the squatter already holds.)
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            taken = squatter.getsockname()[1]
            (tmp_path / services.STATE_FILE).write_text(
                json.dumps(dataclasses.asdict(dataclasses.replace(svc, s3_port=taken)))
            )
            moved = services.start(tmp_path, mlflow=False)
        assert moved.s3_port != taken and moved.secret_key == svc.secret_key
        assert services.Services(**json.loads((tmp_path / services.STATE_FILE).read_text())) == moved
        body = services.s3_admin_client(moved).get_object(Bucket=services.MLFLOW_BUCKET, Key="kept")["Body"].read()
        assert body == b"data"
    finally:
        services.stop(tmp_path)
