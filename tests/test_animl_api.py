"""The export stage pulling from Animl: moto's Cognito and a contract-faithful fake of Animl's API, on loopback."""

import json
import re

import pytest

from animl_retrain.cli import main
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.io import read_json
from animl_retrain.formats import tables
from animl_retrain.integrations.animl import client as animl_api
from animl_retrain.stages import export
from tests.conftest import TEST_SPEC, make_export
from tests.fake_animl import Cognito, FakeAniml

pytestmark = pytest.mark.timeout(120)

PASSWORD = "Correct-horse-9!"
MEMBER = "retrain-bot@example.org"


@pytest.fixture(scope="module")
def cognito():
    """Animl's user pool in moto: a member, an observer, a member of another project, a superuser, a newcomer."""
    pool = Cognito().start()
    try:
        pool.add_user(MEMBER, PASSWORD, ["animl/sci_biosecurity/project_member", "animl/other/project_manager"])
        pool.add_user("observer@example.org", PASSWORD, ["animl/sci_biosecurity/project_observer"])
        pool.add_user("stranger@example.org", PASSWORD, ["animl/other/project_member"])
        pool.add_user("admin@example.org", PASSWORD, ["animl_superuser"])
        pool.add_user("newcomer@example.org", PASSWORD, ["animl/sci_biosecurity/project_member"], permanent=False)
        pool.password_client, _ = pool.add_client(
            "pipeline-password", ["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"]
        )
        pool.foreign_client, _ = pool.add_client("not-animl", ["ALLOW_USER_SRP_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"])
        pool.secret_client, pool.secret = pool.add_client(
            "pipeline-secret", ["ALLOW_USER_SRP_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"], secret=True
        )
        yield pool
    finally:
        pool.stop()


@pytest.fixture
def animl(cognito):
    """A fresh fake Animl API serving one project's export."""
    clients = [cognito.client_id, cognito.password_client, cognito.secret_client]
    fake = FakeAniml(cognito.url, cognito.pool_id, clients, {"sci_biosecurity": make_export()}).start()
    fake.running_polls = 2
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def login_as(cognito, monkeypatch):
    """Put credentials (and moto's Cognito endpoint) in the environment, as the Kubernetes Secret would."""

    def set_env(**credentials):
        for key in animl_api.SECRET_KEYS.values():
            monkeypatch.delenv(key, raising=False)
        for key, value in cognito.env(**credentials).items():
            monkeypatch.setenv(key, value)

    set_env(ANIML_USERNAME=MEMBER, ANIML_PASSWORD=PASSWORD)
    return set_env


def config(animl, cognito, tmp_path, **changes):
    values = {
        "source": "animl-api",
        "label_spec": TEST_SPEC,
        "out": tmp_path / "out",
        "animl_api_url": animl.api_url,
        "animl_project": "sci_biosecurity",
        "animl_client_id": cognito.client_id,
        "animl_user_pool_id": cognito.pool_id,
        "animl_poll_seconds": 0.05,
        "archive": str(tmp_path / "archive"),
        **changes,
    }
    return export.ExportConfig.build(**values)


def settings(animl, cognito, **changes):
    values = {
        "api_url": animl.api_url,
        "project": "sci_biosecurity",
        "client_id": cognito.client_id,
        "user_pool_id": cognito.pool_id,
        "poll_seconds": 0.05,
        **changes,
    }
    return animl_api.AnimlSettings(**values)


@pytest.mark.server
def test_cli_pulls_archives_and_records_the_export(animl, cognito, login_as, tmp_path, capsys):
    """SRP login, the web app's own query, polling to COMPLETE, download, dated archive, report — and no secrets."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    filters = {"cameras": ["X81A2C3D"], "addedStart": "2024-01-01T00:00:00.000Z", "reviewed": True}
    args = ["export", "--source", "animl-api", "--label-spec", TEST_SPEC, "--out", str(out)]
    args += ["--animl-api-url", animl.api_url, "--animl-project", "sci_biosecurity", "--archive", str(archive)]
    args += ["--animl-client-id", cognito.client_id, "--animl-user-pool-id", cognito.pool_id]
    args += ["--animl-filters", json.dumps(filters), "--animl-timezone", "America/Los_Angeles"]
    args += ["--animl-poll-seconds", "0.05"]
    assert main(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)

    # the request is the web app's: a query with ExportInput, then GetTask polls, all for the selected project
    started, *polls = animl.calls
    assert started["operation"] == "ExportAnnotations" and started["project"] == "sci_biosecurity"
    assert started["variables"] == {
        "input": {
            "format": "coco",
            "timezone": "America/Los_Angeles",
            "filters": filters,
            "onlyIncludeReviewed": True,
            "aggregateObjects": False,
        }
    }
    task = animl.tasks[result["animl_task_id"]]
    assert [p["operation"] for p in polls] == ["GetTask"] * task.polls and task.polls >= 3
    assert task.user == MEMBER and task.status == "COMPLETE"

    # the file is the run's export artifact, and a byte-identical copy sits under a dated key with its metadata
    (copy,) = archive.rglob("*_coco.json")
    assert re.fullmatch(
        rf"sci_biosecurity/\d{{4}}-\d\d-\d\d/\d{{6}}Z_{task.id}_coco\.json", str(copy.relative_to(archive))
    )
    assert copy.read_bytes() == (out / "export.json").read_bytes()
    assert json.loads(copy.read_bytes())["info"]["description"].endswith(f"Export ID: {task.id}")
    meta = json.loads(copy.with_name(copy.name.replace(".json", ".meta.json")).read_text())
    assert meta["task_id"] == task.id and meta["count"] == 2 and meta["reviewed"] == 2 and meta["not_reviewed"] == 4
    assert meta["filters"] == filters and meta["fingerprint"] == result["fingerprint"]

    # task id, count and reviewed counts are in the result (the component's metadata) and the report
    assert result["animl_count"] == 2 and result["animl_reviewed"] == 2 and result["animl_not_reviewed"] == 4
    assert result["archive_uri"] == str(copy) and result["decision"] == "train"
    report = read_json(out / "report.json")
    assert report["animl"]["task_id"] == task.id and report["animl"]["exports_started"] == 1
    assert report["archive_uri"] == str(copy)
    assert result["classes"] == {"fox": 1, "rodent": 1}
    assert len(tables.read_table(out / "objects.csv", tables.OBJECTS)) == 2
    assert f"export task `{task.id}`" in (out / "summary.md").read_text()

    # nothing secret in the logs, the report or the archive: no password, no JWT, no presigned signature
    written = captured.out + captured.err + (out / "report.json").read_text() + json.dumps(meta)
    assert PASSWORD not in written and "eyJ" not in written and "X-Amz-Signature" not in written
    assert "logged in to Cognito as 'retrain-bot@example.org' (USER_SRP_AUTH)" in captured.err
    assert f"export task {task.id} SUBMITTED" in captured.err and f"export task {task.id} RUNNING" in captured.err


@pytest.mark.server
def test_user_password_auth_refresh_token_and_client_secret(animl, cognito, login_as, tmp_path):
    """The flows the app client may allow: USER_PASSWORD_AUTH, REFRESH_TOKEN_AUTH, SRP with a client secret."""
    login = animl_api.CognitoLogin(settings(animl, cognito, client_id=cognito.password_client, auth_flow="password"))
    login.id_token()
    assert login.flow_used == "USER_PASSWORD_AUTH"

    tokens = cognito.admin().initiate_auth(
        ClientId=cognito.client_id,
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": MEMBER, "PASSWORD": PASSWORD},
    )["AuthenticationResult"]
    login_as(ANIML_REFRESH_TOKEN=tokens["RefreshToken"])
    result = export.run(config(animl, cognito, tmp_path / "refresh"))
    assert result.animl_task_id in animl.tasks

    login_as(ANIML_USERNAME=MEMBER, ANIML_PASSWORD=PASSWORD, ANIML_CLIENT_SECRET=cognito.secret)
    login = animl_api.CognitoLogin(settings(animl, cognito, client_id=cognito.secret_client))
    claims = animl_api.token_claims(login.id_token())
    assert login.flow_used == "USER_SRP_AUTH" and claims["aud"] == cognito.secret_client
    login_as(ANIML_USERNAME=MEMBER, ANIML_PASSWORD=PASSWORD, ANIML_CLIENT_SECRET="wrong-secret")
    with pytest.raises(PipelineError, match="bad credentials"):
        animl_api.CognitoLogin(settings(animl, cognito, client_id=cognito.secret_client)).id_token()


@pytest.mark.server
@pytest.mark.parametrize(
    ("credentials", "flow", "message"),
    [
        ({"ANIML_USERNAME": MEMBER, "ANIML_PASSWORD": "Wrong-pass-1!"}, "password", "bad credentials for user"),
        ({"ANIML_USERNAME": "nobody@example.org", "ANIML_PASSWORD": PASSWORD}, "password", "there is no user"),
        ({"ANIML_REFRESH_TOKEN": "not-a-refresh-token"}, "auto", "refused the refresh token"),
        ({"ANIML_USERNAME": "newcomer@example.org", "ANIML_PASSWORD": PASSWORD}, "auto", "temporary password"),
        ({"ANIML_USERNAME": MEMBER}, "auto", "no Animl credentials: set ANIML_USERNAME and ANIML_PASSWORD"),
    ],
)
def test_bad_credentials_are_named(animl, cognito, login_as, tmp_path, credentials, flow, message):
    login_as(**credentials)
    cfg = config(animl, cognito, tmp_path, animl_client_id=cognito.password_client, animl_auth_flow=flow)
    with pytest.raises(PipelineError, match=message) as err:
        export.run(cfg)
    assert "Wrong-pass-1!" not in str(err.value) and PASSWORD not in str(err.value)
    assert animl.calls == [] and not (tmp_path / "archive").exists()


@pytest.mark.server
def test_unknown_project_and_missing_role_stop_before_exporting(animl, cognito, login_as, tmp_path):
    with pytest.raises(PipelineError, match=r"project 'sci-biosecurity' is unknown to user .*other, sci_biosecurity"):
        export.run(config(animl, cognito, tmp_path, animl_project="sci-biosecurity"))
    login_as(ANIML_USERNAME="observer@example.org", ANIML_PASSWORD=PASSWORD)
    with pytest.raises(PipelineError, match=r"role\(s\) \['project_observer'\].*needs member or manager"):
        export.run(config(animl, cognito, tmp_path))
    assert animl.calls == []


@pytest.mark.server
def test_api_refusals_are_explained(animl, cognito, login_as):
    """Animl's own answers: FORBIDDEN from its role check, NOT_FOUND tasks, schema validation, wrong path."""
    login_as(ANIML_USERNAME="stranger@example.org", ANIML_PASSWORD=PASSWORD)
    client = animl_api.AnimlClient(settings(animl, cognito))
    with pytest.raises(PipelineError, match=r"FORBIDDEN: ForbiddenError.*needs the member or manager role"):
        client.start_export()

    login_as(ANIML_USERNAME=MEMBER, ANIML_PASSWORD=PASSWORD)
    client = animl_api.AnimlClient(settings(animl, cognito))
    with pytest.raises(PipelineError, match="Task not found"):
        client.wait("000000000000000000000000")
    other = animl_api.AnimlClient(settings(animl, cognito, project="other"))
    task_id = client.start_export()
    with pytest.raises(PipelineError, match="Task does not belong to current project"):
        other.wait(task_id)
    with pytest.raises(PipelineError, match="Cannot query field 'url' on type 'Task'"):
        client.graphql("query T($input: QueryTaskInput!) { task(input: $input) { url } }", {"input": {}}, "T")
    wrong_path = animl_api.AnimlClient(settings(animl, cognito, api_url=animl.api_url.replace("external", "internal")))
    with pytest.raises(PipelineError, match="is not an Animl API path"):
        wrong_path.start_export()


@pytest.mark.server
def test_tokens_animl_would_not_accept(animl, cognito, login_as, tmp_path):
    """API Gateway takes only ID tokens of Animl's app clients: an access token or another client's token is 401."""
    import urllib.error
    import urllib.request

    tokens = cognito.admin().initiate_auth(
        ClientId=cognito.client_id,
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": MEMBER, "PASSWORD": PASSWORD},
    )["AuthenticationResult"]
    body = json.dumps({"query": animl_api.EXPORT_QUERY, "variables": {}, "operationName": "ExportAnnotations"})
    for token, status in ((tokens["AccessToken"], 401), ("not.a.jwt", 401), (tokens["IdToken"], 200)):
        request = urllib.request.Request(
            animl.api_url,
            data=body.encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                got = resp.status
        except urllib.error.HTTPError as e:
            got = e.code if e.code != 400 else 200  # 400: authorised, then the (empty) variables are invalid
        assert got == status
    with pytest.raises(PipelineError, match=r"refused the ID token .*\(401.*check animl_client_id"):
        export.run(config(animl, cognito, tmp_path, animl_client_id=cognito.foreign_client))


@pytest.mark.server
def test_superuser_on_a_project_animl_cannot_export_gets_animls_message(animl, cognito, login_as, tmp_path):
    login_as(ANIML_USERNAME="admin@example.org", ANIML_PASSWORD=PASSWORD)
    with pytest.raises(PipelineError, match=r"failed: Error initializing the export class.*INTERNAL_SERVER_ERROR"):
        export.run(config(animl, cognito, tmp_path, animl_project="no_such_project"))


@pytest.mark.server
def test_failed_task_reports_animls_message(animl, cognito, login_as, tmp_path):
    animl.outcomes.append("fail")
    with pytest.raises(PipelineError, match=r"export task \w+ failed: Error exporting to COCO: .*connection reset"):
        export.run(config(animl, cognito, tmp_path))


@pytest.mark.server
def test_task_stuck_in_running_hits_the_deadline(animl, cognito, login_as, tmp_path):
    animl.outcomes.append("hang")
    with pytest.raises(PipelineError, match=r"still RUNNING after \d+ s \(deadline 1 s\).*15 min"):
        export.run(config(animl, cognito, tmp_path, animl_deadline_minutes=1 / 60, animl_poll_seconds=0.1))
    (task,) = animl.tasks.values()
    assert task.status == "RUNNING" and 3 <= task.polls <= 12


@pytest.mark.server
def test_expired_url_is_exported_once_more(animl, cognito, login_as, tmp_path):
    animl.url_ttls.extend([0, 3600])
    result = export.run(config(animl, cognito, tmp_path))
    assert [c["operation"] for c in animl.calls].count("ExportAnnotations") == 2 and animl.downloads == 1
    assert read_json(tmp_path / "out" / "report.json")["animl"]["exports_started"] == 2
    assert result.animl_task_id == list(animl.tasks)[-1]


@pytest.mark.server
def test_url_expired_twice_is_an_error(animl, cognito, login_as, tmp_path):
    animl.url_ttls.extend([0, 0])
    with pytest.raises(PipelineError, match="has expired, twice"):
        export.run(config(animl, cognito, tmp_path))
    assert len(animl.tasks) == 2 and animl.downloads == 0


@pytest.mark.server
def test_unavailable_api_is_retried(animl, cognito, login_as, tmp_path, caplog):
    animl.unavailable = 2
    caplog.set_level("WARNING", logger="animl_retrain")
    assert export.run(config(animl, cognito, tmp_path)).animl_task_id
    assert caplog.text.count("HTTP 503; retrying") == 2
    animl.unavailable = 10
    with pytest.raises(PipelineError, match="answered 503 to ExportAnnotations"):
        animl_api.AnimlClient(settings(animl, cognito), sleep=lambda s: None).start_export()


@pytest.mark.server
def test_refused_token_logs_in_again_once(animl, cognito, login_as, tmp_path, caplog):
    animl.revoke_token_on_poll = True
    caplog.set_level("INFO", logger="animl_retrain")
    result = export.run(config(animl, cognito, tmp_path))
    assert result.animl_task_id and "answered 401; logging in again" in caplog.text
    assert caplog.text.count("logged in to Cognito") == 2


def test_settings_are_checked_before_any_network(tmp_path):
    base = {"source": "animl-api", "label_spec": TEST_SPEC, "out": tmp_path}
    with pytest.raises(PipelineError, match="--animl-api-url, --animl-project, --animl-client-id, --archive"):
        export.ExportConfig.build(**base)
    full = {
        **base,
        "animl_api_url": "https://abc.execute-api.us-west-2.amazonaws.com/prod/external",
        "animl_project": "p",
        "animl_client_id": "c",
        "archive": "s3://b/exports",
    }
    assert export.ExportConfig.build(**full).animl_region == "us-west-2"
    with pytest.raises(PipelineError, match="must not travel in clear text"):
        export.ExportConfig.build(**{**full, "animl_api_url": "http://abc.example.org/prod/external"})
    with pytest.raises(PipelineError, match=r"unknown keys \['camera'\]"):
        export.ExportConfig.build(**{**full, "animl_filters": '{"camera": ["x"]}'})
    with pytest.raises(PipelineError, match="not valid JSON"):
        export.ExportConfig.build(**{**full, "animl_filters": "{cameras"})
    with pytest.raises(PipelineError, match="needs --model-name"):
        export.ExportConfig.build(**{**full, "incremental": True})
    with pytest.raises(PipelineError, match="SRP login needs animl_user_pool_id"):
        login = animl_api.CognitoLogin(
            animl_api.AnimlSettings(api_url=full["animl_api_url"], project="p", client_id="c"),
            env={"ANIML_USERNAME": "u", "ANIML_PASSWORD": "p"},
        )
        login._srp(None)


def test_validated_fingerprint_tracks_validated_labels_only():
    def fp(data):
        from animl_retrain.formats import cct

        return export.validated_fingerprint(cct.parse(data, "t"))

    base, n = fp(make_export())
    assert n == 3
    renumbered = make_export(
        categories=[{"id": 10 + c["id"], "name": c["name"].upper()} for c in make_export()["categories"]]
    )
    for a in renumbered["annotations"]:
        a["category_id"] += 10
    renumbered["annotations"].reverse()
    renumbered["info"] = {"description": "another export of the same labels"}
    assert fp(renumbered) == (base, 3)
    unreviewed = make_export()
    unreviewed["annotations"].append(
        {"id": "a4", "image_id": "p:aaa", "category_id": 3, "bbox": [1, 1, 5, 5], "validated": False}
    )
    assert fp(unreviewed) == (base, 3)
    corrected = make_export()
    corrected["annotations"][1]["category_id"] = 3
    assert fp(corrected)[0] != base
    added = make_export()
    added["annotations"].append({"id": "a4", "image_id": "p:aaa", "category_id": 3, "bbox": [1, 1, 5, 5]})
    added_fp, added_n = fp(added)
    assert added_n == 4 and added_fp != base


def test_weekly_example_uses_real_pipeline_parameters():
    from pathlib import Path

    from animl_retrain.tools.local_run import _check_params, load_params

    params = load_params(Path(__file__).parents[1] / "examples" / "animl-weekly.yaml", [])
    _check_params(params)
    assert params["export_uri"] == animl_api.SOURCE and params["incremental"] is True
    assert animl_api.parse_filters(params["animl_filters"]) == {}
