"""Bounded fuzzing of the Animl serving handler with hypothesis: hostile bodies get a 4xx, the server stays up.

Runs are derandomized (the same examples every time) and bounded by ``max_examples`` and a per-example
deadline. The model is a tiny classifier checkpoint built by the test; only requests a real client could send
reach it (a decodable image and a valid box), and those must answer 200.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animl_retrain.serving import http as serving
from animl_retrain.serving import request as animl_request
from tests.conftest import jpeg_bytes
from tests.serving_support import LABELS, tiny_checkpoint

FUZZ = settings(
    max_examples=150,
    deadline=2000,  # milliseconds per example
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
IMAGE_B64 = base64.b64encode(jpeg_bytes((48, 40))).decode()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=20,
)
bbox_strings = st.one_of(
    st.text(max_size=40),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6).map(lambda v: ",".join(map(str, v))),
    st.lists(st.integers(-(10**400), 10**400), max_size=6).map(json.dumps),
    st.integers(0, 5000).map(lambda n: "[" * n + "]" * n),
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"image": json_values | st.text(max_size=60), "bbox": json_values}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.fixed_dictionaries({"image": st.just(IMAGE_B64), "bbox": json_values | bbox_strings}).map(
        lambda d: json.dumps(d).encode()
    ),
    st.binary(max_size=200).map(lambda b: json.dumps({"image": base64.b64encode(b).decode()}).encode()),
)


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-model")
    tiny_checkpoint(folder / "model.pt")
    return serving.AnimlHandler(serving.load_classifier(folder, "pytorch"))


def answer(handler, body: bytes) -> int:
    """The status the HTTP front would send for ``body``: 200, or the BadRequest's 4xx."""
    try:
        result = handler.predict(body)
    except animl_request.BadRequest as e:
        assert 400 <= e.status < 500 and e.message
        return e.status
    assert set(result) == set(LABELS) and abs(sum(result.values()) - 1) < 1e-4
    return 200


@FUZZ
@given(body=bodies)
def test_handler_answers_every_body_with_200_or_a_4xx(handler, body):
    answer(handler, body)


@FUZZ
@given(bbox=bbox_strings | json_values)
def test_bbox_that_is_not_four_numbers_in_0_1_is_a_400(handler, bbox):
    status = answer(handler, json.dumps({"image": IMAGE_B64, "bbox": bbox}).encode())
    try:
        valid = animl_request.parse_bbox(bbox) is not None
    except animl_request.BadRequest:
        valid = False
    assert status == (200 if valid else 400)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def test_loopback_server_survives_a_fuzz_run_and_refuses_oversized_bodies(handler):
    limit = 4096
    with serving.running_server(handler, max_request_bytes=limit) as server:
        url = server.url + "/invocations"
        statuses = []

        @FUZZ
        @given(body=bodies)
        def fuzz(body):
            status = post(url, body)
            assert status == 200 or 400 <= status < 500, status
            statuses.append(status)

        fuzz()
        assert post(url, b"x" * (limit + 1)) == 413
        assert post(url, json.dumps({"image": "A" * 10_000}).encode()) == 413
        # a Content-Length that promises more than is sent: refused before reading, from the header alone
        assert post(url, b"{}", {"Content-Length": str(10**12)}) == 413
        with urllib.request.urlopen(server.url + "/ping", timeout=10) as resp:
            assert resp.status == 200  # still up
        assert post(url, json.dumps({"image": IMAGE_B64, "bbox": [0.1, 0.1, 0.9, 0.9]}).encode()) == 200
    assert len(statuses) >= 100 and any(s == 200 for s in statuses) and any(s == 400 for s in statuses)
