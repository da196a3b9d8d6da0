"""Pull a fresh COCO export from Animl's GraphQL API, the way Animl's web app does, so a schedule can retrain.

The contract below was read from the public Animl code (tnc-ca-geo/animl-api and tnc-ca-geo/animl-frontend);
each fact names the file it comes from.

- Login: Animl has no API keys for outside callers. A Cognito user logs in; the web app sends the **ID token**
  (animl-frontend ``src/api/index.js``: ``getIdToken().getJwtToken()``) as ``Authorization: Bearer <token>``
  and the project as ``x-selected-project: <projectId>``. API Gateway verifies the token; the API only decodes
  it (animl-api ``src/api/auth/authorization.ts``) and reads the user's roles from ``cognito:groups``, entries
  ``animl/<projectId>/project_<role>`` (``src/api/db/models/User.ts``) or ``animl_superuser``.
- Roles: ``EXPORT_DATA_ROLES`` and ``READ_TASKS_ROLES`` are ``project_manager`` and ``project_member``
  (``src/api/auth/roles.ts``); anything else gets a ``ForbiddenError`` (``extensions.code`` ``FORBIDDEN``,
  ``src/api/db/models/utils-model.ts`` and ``src/api/errors.ts``).
- Start: GraphQL *query* ``exportAnnotations(input: ExportInput!): Task`` (``Query.ts``)
  with ``ExportInput {format: Format!, timezone: String!, filters: FiltersInput!, onlyIncludeReviewed:
  Boolean!, aggregateObjects: Boolean!}`` (``src/api/type-defs/inputs/ExportInput.ts``); the query text is
  the web app's own (animl-frontend ``src/api/buildQuery.js``). ``FiltersInput`` has ``cameras``,
  ``deployments``, ``labels`` (label ids), ``tags``, ``createdStart/End``, ``addedStart/End``, ``reviewed``,
  ``custom`` (``src/api/type-defs/inputs/QueryImagesInput.ts``; ``tags`` in newer versions).
- Poll: ``task(input: QueryTaskInput!): Task`` with ``Task {_id, user, projectId, type, status, created,
  updated, output}`` (``src/api/type-defs/objects/Task.ts``); status ``SUBMITTED | RUNNING | FAIL | COMPLETE``
  (``src/api/db/schemas/Task.ts``). An unknown task is ``NOT_FOUND`` "Task not found", another project's
  "Task does not belong to current project" (``src/api/db/models/Task.ts``).
- Result: on COMPLETE ``output = {url, count, meta: {reviewedCount: {reviewed, notReviewed}}}``, ``url`` a
  presigned S3 GET valid for one hour (``src/task/annotations.ts``); on FAIL ``output.error`` is the serialised
  GraphQLError (``message``, ``extensions.code``) (``src/task/handler.ts``). The task runs in a Lambda that can
  time out and leave the task RUNNING, so the poller keeps its own deadline.

Credentials come only from the environment (a Kubernetes Secret on a cluster, see :data:`SECRET_KEYS`), never
from pipeline parameters, and neither they nor any token or presigned URL query string reaches a log.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log

SOURCE = "animl-api"

ENV_USERNAME = "ANIML_USERNAME"
ENV_PASSWORD = "ANIML_PASSWORD"
ENV_REFRESH_TOKEN = "ANIML_REFRESH_TOKEN"
ENV_CLIENT_SECRET = "ANIML_CLIENT_SECRET"
# For tests and emulators only: where the Cognito API is (the real one is derived from the region).
ENV_COGNITO_ENDPOINT = "AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER"

# The Kubernetes Secret the export step reads (key -> environment variable). Every key is optional; give a
# username and password, or a refresh token (and the username too if the app client has a secret).
SECRET_NAME = "animl-api-credentials"
SECRET_KEYS = {
    "username": ENV_USERNAME,
    "password": ENV_PASSWORD,
    "refresh-token": ENV_REFRESH_TOKEN,
    "client-secret": ENV_CLIENT_SECRET,
}

EXPORT_ROLES = ("project_manager", "project_member")
SUPERUSER_GROUP = "animl_superuser"
FILTER_KEYS = frozenset(
    {
        "cameras",
        "deployments",
        "labels",
        "tags",
        "createdStart",
        "createdEnd",
        "addedStart",
        "addedEnd",
        "reviewed",
        "custom",
    }
)

# Query texts as animl-frontend's src/api/buildQuery.js sends them.
EXPORT_QUERY = """
query ExportAnnotations($input: ExportInput!) {
  exportAnnotations(input: $input) {
    _id
  }
}
"""
TASK_QUERY = """
query GetTask($input: QueryTaskInput!) {
  task(input: $input) {
    _id
    user
    projectId
    type
    status
    created
    updated
    output
  }
}
"""

AuthFlow = Literal["auto", "srp", "password"]
_RETRY_HTTP = {429, 500, 502, 503, 504}


class ExpiredURLError(PipelineError):
    """The presigned export URL was refused as expired."""


@dataclass(frozen=True)
class AnimlSettings:
    """Where and what to export; nothing secret (the credentials come from the environment)."""

    api_url: str
    project: str
    client_id: str
    region: str = "us-west-2"
    user_pool_id: str = ""
    auth_flow: AuthFlow = "auto"
    timezone: str = "UTC"
    filters: dict[str, Any] = field(default_factory=dict)
    only_include_reviewed: bool = True
    aggregate_objects: bool = False
    poll_seconds: float = 2.0
    max_poll_seconds: float = 30.0
    deadline_seconds: float = 1800.0
    request_timeout: float = 60.0
    max_bytes: int | None = None


@dataclass
class PulledExport:
    """One export fetched from Animl, with what Animl said about it."""

    raw: bytes
    task_id: str
    count: int | None
    reviewed: int | None
    not_reviewed: int | None
    exports_started: int
    user: str
    url: str  # without its query string (the presigned signature)

    def metadata(self) -> dict[str, Any]:
        """What the report records about the pull (no secrets)."""
        return {
            "task_id": self.task_id,
            "count": self.count,
            "reviewed": self.reviewed,
            "not_reviewed": self.not_reviewed,
            "exports_started": self.exports_started,
            "user": self.user,
            "url": self.url,
        }


def parse_filters(text: str) -> dict[str, Any]:
    """Animl's ``FiltersInput`` from a JSON string, with the unknown keys named."""
    try:
        filters = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise PipelineError(f"animl_filters is not valid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(filters, dict):
        raise PipelineError(f"animl_filters must be a JSON object, got {type(filters).__name__}")
    unknown = sorted(set(filters) - FILTER_KEYS)
    if unknown:
        raise PipelineError(f"animl_filters: unknown keys {unknown}; Animl's FiltersInput has {sorted(FILTER_KEYS)}")
    return filters


def check_api_url(url: str) -> str:
    """The API URL, refusing clear-text HTTP to anything but this machine (the ID token travels with it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineError(f"animl_api_url {url!r} is not an http(s) URL (expected https://…/<stage>/external)")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise PipelineError(f"animl_api_url {url!r}: use https; the ID token must not travel in clear text")
    return url


def public_url(url: str) -> str:
    """A URL without its query string, for logs and reports (a presigned URL's query is a credential)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def token_claims(token: str) -> dict[str, Any]:
    """The claims of our own ID token, without verifying it (API Gateway does that on Animl's side)."""
    import jwt

    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise PipelineError(f"Cognito returned an ID token that is not a JWT: {e}") from e


def project_roles(claims: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{projectId: [role, ...]}`` from the token's ``cognito:groups``, parsed as Animl's API parses them."""
    roles: dict[str, list[str]] = {}
    for group in claims.get("cognito:groups") or []:
        parts = str(group).split("/")
        if len(parts) == 3:
            roles.setdefault(parts[1], []).append(parts[2])
    return roles


def check_export_role(claims: Mapping[str, Any], project: str) -> None:
    """Fail before starting anything when the user may not export ``project`` (unknown project or role)."""
    if SUPERUSER_GROUP in (claims.get("cognito:groups") or []):
        return
    user = claims.get("cognito:username") or claims.get("email") or claims.get("sub")
    roles = project_roles(claims)
    if project not in roles:
        known = ", ".join(sorted(roles)) or "none"
        raise PipelineError(
            f"Animl project {project!r} is unknown to user {user!r}: the user has no role in it (its projects: "
            f"{known}). Check animl_project (the project id from Animl's URL, not its display name) or add the "
            "user to the project with the member role"
        )
    if not set(roles[project]) & set(EXPORT_ROLES):
        raise PipelineError(
            f"user {user!r} has role(s) {roles[project]} in Animl project {project!r}; exporting needs "
            "member or manager: a project manager can change the role under Manage users"
        )


class CognitoLogin:
    """ID tokens for the dedicated Animl user, from Cognito.

    With ``ANIML_REFRESH_TOKEN`` it uses ``REFRESH_TOKEN_AUTH`` (falling back to the password when the refresh
    token is refused and one is set); with ``ANIML_USERNAME``/``ANIML_PASSWORD`` it uses SRP (``USER_SRP_AUTH``,
    what Animl's web app uses, so the password never leaves this process) or ``USER_PASSWORD_AUTH``;
    ``auto`` tries SRP and falls back when the app client does not allow it.
    """

    def __init__(self, settings: AnimlSettings, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        self.settings = settings
        self.username = env.get(ENV_USERNAME, "").strip()
        self._password = env.get(ENV_PASSWORD, "")
        self._refresh_token = env.get(ENV_REFRESH_TOKEN, "").strip()
        self._client_secret = env.get(ENV_CLIENT_SECRET, "")
        self._endpoint = env.get(ENV_COGNITO_ENDPOINT) or f"https://cognito-idp.{settings.region}.amazonaws.com"
        self._token = ""
        self._expires = 0.0
        self.flow_used = ""
        if not self._refresh_token and not (self.username and self._password):
            raise PipelineError(
                f"no Animl credentials: set {ENV_USERNAME} and {ENV_PASSWORD}, or {ENV_REFRESH_TOKEN}, in the "
                f"environment (on a cluster, from the Kubernetes Secret {SECRET_NAME!r}; see the README)"
            )

    def id_token(self, force: bool = False) -> str:
        """A valid ID token, logging in again when it is forced, missing or expires within a minute."""
        if force or not self._token or time.time() > self._expires - 60:
            self._login()
        return self._token

    def _client(self):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        config = Config(
            signature_version=UNSIGNED,  # InitiateAuth is a public API: no AWS credentials involved
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=15,
            read_timeout=30,
        )
        return boto3.session.Session().client(
            "cognito-idp", region_name=self.settings.region, endpoint_url=self._endpoint, config=config
        )

    def _login(self) -> None:
        client = self._client()
        result = None
        if self._refresh_token:
            try:
                result = self._refresh(client)
            except PipelineError:
                if not (self.username and self._password):
                    raise
                log.warning("animl: the refresh token was refused; logging in with the password instead")
        if result is None:
            result = self._password_login(client)
        self._token = result["IdToken"]
        claims = token_claims(self._token)
        self._expires = float(claims.get("exp") or time.time() + int(result.get("ExpiresIn", 3600)))
        self.username = self.username or str(claims.get("cognito:username", ""))
        log.info("animl: logged in to Cognito as %r (%s)", self.username, self.flow_used)

    def _secret_hash(self, username: str) -> dict[str, str]:
        if not self._client_secret:
            return {}
        from pycognito.aws_srp import AWSSRP

        return {"SECRET_HASH": AWSSRP.get_secret_hash(username, self.settings.client_id, self._client_secret)}

    def _refresh(self, client) -> dict[str, Any]:
        if self._client_secret and not self.username:
            raise PipelineError(f"the app client has a secret: set {ENV_USERNAME} along with {ENV_REFRESH_TOKEN}")
        params = {"REFRESH_TOKEN": self._refresh_token, **self._secret_hash(self.username)}
        response = self._call(self._initiate(client, "REFRESH_TOKEN_AUTH", params), "REFRESH_TOKEN_AUTH")
        self.flow_used = "REFRESH_TOKEN_AUTH"
        return self._result(response)

    def _password_login(self, client) -> dict[str, Any]:
        if not (self.username and self._password):
            raise PipelineError(f"set {ENV_USERNAME} and {ENV_PASSWORD} to log in with a password")
        flow = self.settings.auth_flow
        if flow in ("auto", "srp"):
            try:
                return self._srp(client)
            except _FlowNotAllowed as e:
                if flow == "srp":
                    raise PipelineError(str(e)) from e
                log.info("animl: %s; trying USER_PASSWORD_AUTH", e)
        params = {"USERNAME": self.username, "PASSWORD": self._password, **self._secret_hash(self.username)}
        try:
            response = self._call(self._initiate(client, "USER_PASSWORD_AUTH", params), "USER_PASSWORD_AUTH")
        except _FlowNotAllowed as e:
            raise PipelineError(f"{e}; enable USER_SRP_AUTH or USER_PASSWORD_AUTH on the app client") from e
        self.flow_used = "USER_PASSWORD_AUTH"
        return self._result(response)

    def _srp(self, client) -> dict[str, Any]:
        from pycognito import exceptions as pce
        from pycognito.aws_srp import AWSSRP

        pool = self.settings.user_pool_id
        if "_" not in pool:
            raise PipelineError(
                f"SRP login needs animl_user_pool_id (like 'us-west-2_AbCdEf123'), got {pool!r}; "
                "or set animl_auth_flow to 'password' if the app client allows USER_PASSWORD_AUTH"
            )
        srp = AWSSRP(
            username=self.username,
            password=self._password,
            pool_id=pool,
            client_id=self.settings.client_id,
            client=client,
            client_secret=self._client_secret or None,
        )
        try:
            response = self._call(srp.authenticate_user, "USER_SRP_AUTH")
        except pce.ForceChangePasswordException as e:
            raise PipelineError(_new_password_hint(self.username)) from e
        except pce.MFAChallengeException as e:
            raise PipelineError(_mfa_hint(self.username)) from e
        self.flow_used = "USER_SRP_AUTH"
        return self._result(response)

    def _initiate(self, client, flow: str, params: dict[str, str]) -> Callable[[], dict[str, Any]]:
        return lambda: client.initiate_auth(AuthFlow=flow, ClientId=self.settings.client_id, AuthParameters=params)

    def _call(self, fn: Callable[[], dict[str, Any]], flow: str) -> dict[str, Any]:
        """Call Cognito, turning its errors into messages that say what to fix (never echoing a secret)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            message = e.response.get("Error", {}).get("Message", "")
            raise _cognito_error(code, message, flow, self) from None
        except BotoCoreError as e:
            raise PipelineError(f"cannot reach Cognito at {self._endpoint}: {e}") from None

    def _result(self, response: dict[str, Any]) -> dict[str, Any]:
        challenge = response.get("ChallengeName")
        if challenge == "NEW_PASSWORD_REQUIRED":
            raise PipelineError(_new_password_hint(self.username))
        if challenge:
            raise PipelineError(f"Cognito asks for {challenge}: {_mfa_hint(self.username)}")
        result = response.get("AuthenticationResult") or {}
        if not result.get("IdToken"):
            raise PipelineError("Cognito answered the login without an ID token")
        return result


class _FlowNotAllowed(PipelineError):
    """The app client does not allow this authentication flow."""


def _new_password_hint(username: str) -> str:
    return (
        f"Cognito user {username!r} still has its temporary password: log in once at Animl's web app and set a "
        "permanent one (or `aws cognito-idp admin-set-user-password --permanent`), then store that in the Secret"
    )


def _mfa_hint(username: str) -> str:
    return f"Cognito user {username!r} has multi-factor authentication on; a pipeline's dedicated user cannot answer it"


def _cognito_error(code: str, message: str, flow: str, login: CognitoLogin) -> PipelineError:
    where = f"Cognito ({flow}, app client {login.settings.client_id!r}, region {login.settings.region})"
    if code == "InvalidParameterException" and re.search(r"flow|not enabled|not supported", message, re.I):
        return _FlowNotAllowed(f"{where}: the app client does not allow {flow} ({message})")
    if code == "NotAuthorizedException" and flow == "REFRESH_TOKEN_AUTH":
        return PipelineError(
            f"{where} refused the refresh token: {message}. Refresh tokens expire (30 days unless the app "
            f"client says otherwise): store a new one in {ENV_REFRESH_TOKEN}, or set {ENV_USERNAME} and "
            f"{ENV_PASSWORD} instead"
        )
    hints = {
        "NotAuthorizedException": f"bad credentials for user {login.username!r}: {message}. "
        f"Check {ENV_USERNAME} and {ENV_PASSWORD} in the Secret {SECRET_NAME!r}",
        "UserNotFoundException": f"there is no user {login.username!r} in the user pool: check {ENV_USERNAME}",
        "UserNotConfirmedException": f"user {login.username!r} is not confirmed yet",
        "PasswordResetRequiredException": f"user {login.username!r} must reset the password first",
        "ResourceNotFoundException": f"unknown app client or user pool ({message}): check animl_client_id, "
        "animl_user_pool_id and animl_region",
        "TooManyRequestsException": f"too many logins just now ({message}); try again later",
    }
    return PipelineError(f"{where}: {hints.get(code, f'{code}: {message}')}")


class AnimlClient:
    """Animl's GraphQL API at ``/external``, as one project's dedicated user."""

    def __init__(
        self,
        settings: AnimlSettings,
        login: CognitoLogin | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.login = login or CognitoLogin(settings)
        self._sleep = sleep
        self._clock = clock
        check_api_url(settings.api_url)

    # -- GraphQL ---------------------------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict[str, Any], operation: str) -> dict[str, Any]:
        """POST one operation; retry transient failures; log in again once if the token is refused."""
        body = json.dumps({"query": query, "variables": variables, "operationName": operation}).encode()
        relogged = False
        for attempt in range(5):
            headers = {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "Authorization": f"Bearer {self.login.id_token()}",
                "x-selected-project": self.settings.project,
            }
            request = urllib.request.Request(self.settings.api_url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.settings.request_timeout) as resp:
                    payload = json.loads(resp.read() or b"{}")
                break
            except urllib.error.HTTPError as e:
                text = e.read()[:2000].decode("utf-8", "replace")
                if e.code == 401 and not relogged:
                    log.info("animl: %s answered 401; logging in again", public_url(self.settings.api_url))
                    self.login.id_token(force=True)
                    relogged = True
                    continue
                if e.code in _RETRY_HTTP and attempt < 4:
                    self._backoff(attempt, f"HTTP {e.code}")
                    continue
                errors = _json_errors(text)  # Apollo answers 400 with GraphQL errors for invalid requests
                if errors:
                    raise self._graphql_error(errors[0], operation) from None
                raise self._http_error(e.code, text, operation) from None
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
                if attempt < 4:
                    self._backoff(attempt, str(e))
                    continue
                raise PipelineError(
                    f"cannot reach Animl's API at {public_url(self.settings.api_url)} ({operation}): {e}"
                ) from None
        else:
            raise PipelineError(f"Animl's API at {public_url(self.settings.api_url)} kept failing ({operation})")
        if not isinstance(payload, dict):
            raise PipelineError(f"Animl's API answered {operation} with {type(payload).__name__}, not a JSON object")
        errors = payload.get("errors") or []
        if errors:
            raise self._graphql_error(errors[0], operation)
        return payload.get("data") or {}

    def _backoff(self, attempt: int, why: str) -> None:
        delay = min(10.0, 0.5 * 2**attempt)
        log.warning("animl: %s; retrying in %.1f s", why, delay)
        self._sleep(delay)

    def _http_error(self, status: int, text: str, operation: str) -> PipelineError:
        url = public_url(self.settings.api_url)
        if status in (401, 403) and "Missing Authentication Token" in text:
            return PipelineError(f"{url} is not an Animl API path (API Gateway: {text.strip()}); it ends in /external")
        if status in (401, 403):
            return PipelineError(
                f"Animl's API at {url} refused the ID token of {self.login.username!r} ({status}: {text.strip()}); "
                "check animl_client_id and animl_region: the token must come from Animl's own user pool"
            )
        if status == 404:
            return PipelineError(f"Animl's API is not at {url} (404); it ends in /<stage>/external")
        return PipelineError(f"Animl's API at {url} answered {status} to {operation}: {text.strip()[:500]}")

    def _graphql_error(self, error: dict[str, Any], operation: str) -> PipelineError:
        message = str(error.get("message", error))
        code = (error.get("extensions") or {}).get("code", "")
        project = self.settings.project
        if code == "FORBIDDEN":
            return PipelineError(
                f"Animl refused {operation} for project {project!r} (FORBIDDEN: {message}): user "
                f"{self.login.username!r} needs the member or manager role on the project"
            )
        if code in ("AUTHENTICATION_ERROR", "UNAUTHENTICATED"):
            return PipelineError(f"Animl did not accept the login of {self.login.username!r}: {message}")
        if code == "GRAPHQL_VALIDATION_FAILED" or "Variable" in message:
            return PipelineError(
                f"Animl rejected the {operation} request: {message} (check animl_filters; this API version may "
                "differ from the one this client was written for)"
            )
        return PipelineError(f"Animl {operation} failed ({code or 'error'}): {message}")

    # -- export task -----------------------------------------------------------------------------------------
    def start_export(self) -> str:
        """Start an export task; return its id."""
        s = self.settings
        data = self.graphql(
            EXPORT_QUERY,
            {
                "input": {
                    "format": "coco",
                    "timezone": s.timezone,
                    "filters": s.filters,
                    "onlyIncludeReviewed": s.only_include_reviewed,
                    "aggregateObjects": s.aggregate_objects,
                }
            },
            "ExportAnnotations",
        )
        task = data.get("exportAnnotations") or {}
        if not task.get("_id"):
            raise PipelineError(f"Animl started no export task for project {s.project!r} (answer: {data})")
        log.info("animl: export task %s started for project %r", task["_id"], s.project)
        return str(task["_id"])

    def wait(self, task_id: str) -> dict[str, Any]:
        """Poll the task with backoff until COMPLETE (return its output), FAIL or the deadline (raise)."""
        start = self._clock()
        deadline = start + self.settings.deadline_seconds
        interval = self.settings.poll_seconds
        status = "SUBMITTED"
        while True:
            data = self.graphql(TASK_QUERY, {"input": {"taskId": task_id}}, "GetTask")
            task = data.get("task")
            if not task:
                raise PipelineError(f"Animl returned no task {task_id!r} for project {self.settings.project!r}")
            status = str(task.get("status"))
            output = task.get("output") or {}
            if status == "COMPLETE":
                log.info("animl: export task %s complete after %.0f s", task_id, self._clock() - start)
                return output
            if status == "FAIL":
                raise PipelineError(f"Animl export task {task_id} failed: {_task_error(output)}")
            if status not in ("SUBMITTED", "RUNNING"):
                raise PipelineError(f"Animl export task {task_id} has an unknown status {status!r}")
            now = self._clock()
            if now + interval > deadline:
                raise PipelineError(
                    f"Animl export task {task_id} is still {status} after {now - start:.0f} s "
                    f"(deadline {self.settings.deadline_seconds:.0f} s). Animl's export Lambda stops after 15 min "
                    "and can leave the task RUNNING; narrow animl_filters or raise animl_deadline_minutes"
                )
            log.info("animl: export task %s %s (%.0f s)", task_id, status, now - start)
            self._sleep(interval)
            interval = min(interval * 1.5, self.settings.max_poll_seconds)

    def download(self, url: str) -> bytes:
        """Fetch the export from its presigned URL at once; an expired URL raises :class:`ExpiredURLError`."""
        limit = self.settings.max_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.settings.request_timeout) as resp:
                size = resp.headers.get("Content-Length")
                if limit is not None and size is not None and int(size) > limit:
                    raise PipelineError(f"the export at {public_url(url)} is {size} bytes, over the limit of {limit}")
                chunks, total = [], 0
                while chunk := resp.read(1 << 20):
                    total += len(chunk)
                    if limit is not None and total > limit:
                        raise PipelineError(f"the export at {public_url(url)} is over the limit of {limit} bytes")
                    chunks.append(chunk)
        except urllib.error.HTTPError as e:
            text = e.read()[:2000].decode("utf-8", "replace")
            if e.code in (400, 403) and "expired" in text.lower():
                raise ExpiredURLError(f"the presigned export URL {public_url(url)} has expired") from None
            raise PipelineError(
                f"downloading the export from {public_url(url)} failed: HTTP {e.code} {text[:300]}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            raise PipelineError(f"cannot download the export from {public_url(url)}: {e}") from None
        return b"".join(chunks)

    def pull_export(self) -> PulledExport:
        """Log in, check the role, export, wait and download; start one more export if the URL had expired."""
        claims = token_claims(self.login.id_token())
        check_export_role(claims, self.settings.project)
        for started in (1, 2):
            task_id = self.start_export()
            output = self.wait(task_id)
            url = output.get("url")
            if not url:
                raise PipelineError(f"Animl export task {task_id} completed without a URL (output: {output})")
            try:
                raw = self.download(url)
            except ExpiredURLError as e:
                if started == 2:
                    raise PipelineError(
                        f"{e}, twice: the second export's URL expired too before it could be fetched. Is this "
                        "machine's clock right, and can it reach S3 quickly?"
                    ) from e
                log.warning("animl: %s; starting the export once more", e)
                continue
            reviewed = (output.get("meta") or {}).get("reviewedCount") or {}
            log.info("animl: downloaded %d bytes (%s images) from %s", len(raw), output.get("count"), public_url(url))
            return PulledExport(
                raw=raw,
                task_id=task_id,
                count=output.get("count"),
                reviewed=reviewed.get("reviewed"),
                not_reviewed=reviewed.get("notReviewed"),
                exports_started=started,
                user=self.login.username,
                url=public_url(url),
            )
        raise AssertionError("unreachable")


def _task_error(output: dict[str, Any]) -> str:
    """Animl's message from a failed task's ``output.error`` (a serialised GraphQLError, or older shapes)."""
    error = output.get("error")
    if isinstance(error, list):
        error = error[0] if error else None
    if isinstance(error, dict):
        code = (error.get("extensions") or {}).get("code")
        return str(error.get("message") or error) + (f" ({code})" if code else "")
    return str(error) if error else f"no error message (output: {output})"


def _json_errors(text: str) -> list[dict[str, Any]]:
    """The GraphQL ``errors`` of an HTTP error body, if it is one."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    errors = data.get("errors") if isinstance(data, dict) else None
    return [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else []
