import time

import pytest

from animl_retrain import services
from animl_retrain.common import PipelineError

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
