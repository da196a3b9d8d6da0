"""A contract-faithful stand-in for Animl's export API, with Cognito through moto, both on loopback.

- Cognito: moto's user pool service in server mode (``ThreadedMotoServer``): a real pool, app client, users and
  the ``animl/<project>/project_<role>`` groups Animl uses; tokens are RS256 JWTs signed with moto's key.
- Animl: an HTTP server that behaves like API Gateway + Animl's GraphQL handler at ``/<stage>/external``:
  it verifies the ``Authorization: Bearer <ID token>`` against moto's JWKS (issuer, audience = app client,
  ``token_use`` = id, expiry; 401 ``{"message": "Unauthorized"}`` otherwise, 403 "Missing Authentication Token"
  for other paths), executes the request with graphql-core against Animl's own type definitions (so a wrong
  query, input type or field is rejected as Animl would), checks roles from ``cognito:groups`` and
  ``x-selected-project`` like ``src/api/auth/authorization.ts``, and runs export tasks SUBMITTED → RUNNING →
  COMPLETE (or FAIL, or stuck in RUNNING). A COMPLETE task's ``output.url`` is a signed URL on the same server
  that expires like an S3 presigned GET (403 AccessDenied "Request has expired").
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REGION = "us-west-2"
STAGE = "dev"

# Animl's type definitions, as far as the export uses them (see src/animl_retrain/animl_api.py for sources).
SCHEMA = """
scalar Date
scalar JSONObject

enum Format {
  csv
  coco
}

input FiltersInput {
  createdStart: Date
  createdEnd: Date
  addedStart: Date
  addedEnd: Date
  cameras: [String!]
  deployments: [String!]
  labels: [String]
  tags: [String!]
  reviewed: Boolean
  custom: String
}

input ExportInput {
  format: Format!
  timezone: String!
  filters: FiltersInput!
  onlyIncludeReviewed: Boolean!
  aggregateObjects: Boolean!
}

input QueryTaskInput {
  taskId: ID!
}

type Task {
  _id: ID!
  user: String!
  projectId: String!
  type: String!
  status: String!
  created: Date!
  updated: Date!
  output: JSONObject
}

type Query {
  task(input: QueryTaskInput!): Task
  exportAnnotations(input: ExportInput!): Task
}
"""

BEARER = re.compile(r"^Bearer [-_=.0-9a-zA-Z]+$", re.I)
EXPORT_ROLES = {"project_manager", "project_member"}


@dataclass
class Task:
    """One export task and how it will go."""

    id: str
    user: str
    project: str
    outcome: str  # complete | fail | hang
    url_ttl: int
    created: str
    polls: int = 0
    status: str = "SUBMITTED"
    output: dict[str, Any] | None = None
    input: dict[str, Any] = field(default_factory=dict)


class FakeAniml:
    """Animl's ``/external`` GraphQL endpoint and its export bucket, on 127.0.0.1."""

    def __init__(self, cognito_url: str, pool_id: str, client_ids: list[str], exports: dict[str, dict], region=REGION):
        self.issuer = f"https://cognito-idp.{region}.amazonaws.com/{pool_id}"
        self.client_ids = client_ids  # the app clients API Gateway's Cognito authorizer accepts
        self.exports = exports
        self.jwks_url = f"{cognito_url}/{pool_id}/.well-known/jwks.json"
        self.outcomes: deque[str] = deque()  # per new task; default "complete"
        self.url_ttls: deque[int] = deque()  # per new task; default 3600 s
        self.running_polls = 2
        self.revoke_token_on_poll = False
        self.unavailable = 0  # answer this many of the next POSTs with 503, as a throttled API Gateway does
        self.fail_message = "Error exporting to COCO: Error counting images: connection reset"
        self.not_reviewed = 4
        self.tasks: dict[str, Task] = {}
        self.calls: list[dict[str, Any]] = []
        self.downloads = 0
        self._revoked: set[str] = set()
        self._url_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._keys = None
        self._schema = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeAniml:
        import jwt
        from graphql import build_schema

        with urllib.request.urlopen(self.jwks_url, timeout=10) as resp:
            self._keys = jwt.PyJWKSet.from_dict(json.loads(resp.read()))
        self._schema = build_schema(SCHEMA)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.base}/{STAGE}/external"

    # -- API Gateway: the Cognito authorizer ------------------------------------------------------------------
    def verify(self, header: str | None) -> dict[str, Any] | None:
        """The token's claims if API Gateway's Cognito authorizer would let it through, else None."""
        import jwt

        if not header or not BEARER.match(header):
            return None
        token = header.split(" ", 1)[1]
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            claims = jwt.decode(
                token,
                key=self._keys[kid].key,
                algorithms=["RS256"],
                audience=self.client_ids,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "token_use", "cognito:username"]},
            )
        except (jwt.PyJWTError, KeyError):
            return None
        if claims.get("token_use") != "id" or claims.get("jti") in self._revoked:
            return None
        return claims

    # -- Animl's resolvers -----------------------------------------------------------------------------------
    def _user(self, claims: dict[str, Any], project: str) -> dict[str, Any]:
        roles: dict[str, list[str]] = {}
        for group in claims.get("cognito:groups", []):
            parts = group.split("/")
            if len(parts) == 3:
                roles.setdefault(parts[1], []).append(parts[2])
        return {
            **claims,
            "curr_project": project,
            "is_superuser": "animl_superuser" in claims.get("cognito:groups", []),
            "curr_project_roles": roles.get(project, []),
        }

    @staticmethod
    def _require(user: dict[str, Any], roles: set[str]) -> None:
        from graphql import GraphQLError

        if not (user["is_superuser"] or set(user["curr_project_roles"]) & roles):
            raise GraphQLError("ForbiddenError", extensions={"code": "FORBIDDEN"})

    def _export_annotations(self, info, input):
        user = info.context
        self._require(user, EXPORT_ROLES)
        now = _now_iso()
        task = Task(
            id=secrets.token_hex(12),
            user=user["cognito:username"],
            project=user["curr_project"],
            outcome=self.outcomes.popleft() if self.outcomes else "complete",
            url_ttl=self.url_ttls.popleft() if self.url_ttls else 3600,
            created=now,
            input=input,
        )
        self.tasks[task.id] = task
        return self._task_view(task)

    def _task(self, info, input):
        from graphql import GraphQLError

        user = info.context
        self._require(user, EXPORT_ROLES)
        task = self.tasks.get(input["taskId"])
        if task is None:
            raise GraphQLError("Task not found", extensions={"code": "NOT_FOUND"})
        if task.project != user["curr_project"]:
            raise GraphQLError("Task does not belong to current project", extensions={"code": "NOT_FOUND"})
        self._advance(task)
        return self._task_view(task)

    def _advance(self, task: Task) -> None:
        task.polls += 1
        if task.status in ("COMPLETE", "FAIL") or task.polls == 1:
            return  # first poll: still SUBMITTED, the queue has not handed it to the task Lambda yet
        task.status = "RUNNING"
        if task.outcome == "hang" or task.polls <= 1 + self.running_polls:
            return
        if task.outcome == "fail" or task.project not in self.exports:
            message = self.fail_message
            if task.project not in self.exports:
                message = "Error initializing the export class: Cannot read properties of undefined (reading 'labels')"
            task.status = "FAIL"
            task.output = {"error": {"message": message, "extensions": {"code": "INTERNAL_SERVER_ERROR"}}}
            return
        export = self.exports[task.project]
        task.status = "COMPLETE"
        task.output = {
            "url": self._presign(f"/animl-exported-data-{STAGE}/{task.id}_coco.json", task.url_ttl),
            "count": len(export["images"]),
            "meta": {"reviewedCount": {"reviewed": len(export["images"]), "notReviewed": self.not_reviewed}},
        }

    def _task_view(self, task: Task) -> dict[str, Any]:
        return {
            "_id": task.id,
            "user": task.user,
            "projectId": task.project,
            "type": "ExportAnnotations",
            "status": task.status,
            "created": task.created,
            "updated": _now_iso(),
            "output": task.output,
        }

    def export_bytes(self, task_id: str) -> bytes:
        """The export file as Animl writes it: the project's data with this export's id and date."""
        task = self.tasks[task_id]
        data = copy.deepcopy(self.exports[task.project])
        data["info"] = {
            "version": "1.0",
            "description": f"Image data exported from Animl project '{task.project}'. Export ID: {task.id}",
            "year": dt.datetime.now(dt.UTC).year,
            "date_created": _now_iso(),
        }
        return json.dumps(data, indent=4).encode()

    # -- S3 presigned URLs -----------------------------------------------------------------------------------
    def _presign(self, path: str, ttl: int) -> str:
        date = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        sig = hmac.new(self._url_key, f"{path}|{date}|{ttl}".encode(), hashlib.sha256).hexdigest()
        query = urllib.parse.urlencode(
            {
                "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                "X-Amz-Credential": "ASIAFAKE/20240101/us-west-2/s3/aws4_request",
                "X-Amz-Date": date,
                "X-Amz-Expires": ttl,
                "X-Amz-SignedHeaders": "host",
                "X-Amz-Signature": sig,
            }
        )
        return f"{self.base}{path}?{query}"

    def _check_presigned(self, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        date, ttl, sig = query.get("X-Amz-Date", ""), query.get("X-Amz-Expires", ""), query.get("X-Amz-Signature", "")
        good = hmac.new(self._url_key, f"{path}|{date}|{ttl}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(good, sig):
            return 403, _s3_error("SignatureDoesNotMatch", "The request signature we calculated does not match")
        issued = dt.datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        if dt.datetime.now(dt.UTC) >= issued + dt.timedelta(seconds=int(ttl)):
            return 403, _s3_error("AccessDenied", "Request has expired")
        task_id = path.rsplit("/", 1)[-1].removesuffix("_coco.json")
        if task_id not in self.tasks:
            return 404, _s3_error("NoSuchKey", "The specified key does not exist.")
        return 200, self.export_bytes(task_id)

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output quiet
                pass

            def _send(self, status: int, body: bytes, content_type="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                with fake._lock:
                    status, body = fake._check_presigned(parts.path, query)
                    fake.downloads += status == 200
                self._send(status, body, "application/json" if status == 200 else "application/xml")

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with fake._lock:
                    unavailable, fake.unavailable = fake.unavailable > 0, max(0, fake.unavailable - 1)
                if unavailable:
                    return self._send(503, b'{"message":"Service Unavailable"}')
                if urllib.parse.urlsplit(self.path).path.rstrip("/") != f"/{STAGE}/external":
                    return self._send(403, b'{"message":"Missing Authentication Token"}')
                with fake._lock:
                    claims = fake.verify(self.headers.get("Authorization"))
                if claims is None:
                    return self._send(401, b'{"message":"Unauthorized"}')
                if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                    return self._send(400, b'{"errors":[{"message":"expected application/json"}]}')
                status, payload = fake.execute(body, claims, self.headers.get("x-selected-project") or "")
                self._send(status, json.dumps(payload).encode())

        return Handler

    def execute(self, body: bytes, claims: dict[str, Any], project: str) -> tuple[int, dict[str, Any]]:
        """Run one GraphQL request as Animl's handler would; record it for the tests."""
        from graphql import graphql_sync, parse, validate

        try:
            request = json.loads(body)
            document = parse(request["query"])
        except Exception as e:
            return 400, {"errors": [{"message": f"bad request: {e}", "extensions": {"code": "BAD_REQUEST"}}]}
        problems = validate(self._schema, document)
        if problems:
            return 400, {
                "errors": [{**p.formatted, "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}} for p in problems]
            }
        with self._lock:
            self.calls.append(
                {"operation": request.get("operationName"), "project": project, "variables": request.get("variables")}
            )
            if self.revoke_token_on_poll and request.get("operationName") == "GetTask":
                self.revoke_token_on_poll = False
                self._revoked.add(claims.get("jti"))
                return 401, {"message": "Unauthorized"}
            result = graphql_sync(
                self._schema,
                request["query"],
                root_value={"exportAnnotations": self._export_annotations, "task": self._task},
                context_value=self._user(claims, project),
                variable_values=request.get("variables"),
                operation_name=request.get("operationName"),
            )
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            payload["errors"] = [e.formatted for e in result.errors]
        return 200, payload


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _s3_error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    ).encode()


class Cognito:
    """A user pool in moto's Cognito (server mode, loopback): Animl's app client, users and role groups."""

    def __init__(self):
        self.server = None
        self.url = ""
        self.pool_id = ""
        self.client_id = ""  # the web app's client: SRP and refresh tokens, no secret

    def start(self) -> Cognito:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        admin = self.admin()
        self.pool_id = admin.create_user_pool(PoolName="animl-users")["UserPool"]["Id"]
        self.client_id, _ = self.add_client("animl-frontend", ["ALLOW_USER_SRP_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"])
        return self

    def add_client(self, name: str, flows: list[str], secret: bool = False) -> tuple[str, str]:
        """Another app client of the pool; returns its id and secret ('' without)."""
        client = self.admin().create_user_pool_client(
            UserPoolId=self.pool_id, ClientName=name, ExplicitAuthFlows=flows, GenerateSecret=secret
        )["UserPoolClient"]
        return client["ClientId"], client.get("ClientSecret", "")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def admin(self):
        """An admin boto3 client for the pool (moto accepts any credentials)."""
        import boto3

        return boto3.session.Session().client(
            "cognito-idp",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def add_user(self, username: str, password: str, groups: list[str], permanent: bool = True) -> None:
        """A user with a password and Animl role groups like ``animl/<project>/project_member``."""
        admin = self.admin()
        admin.admin_create_user(
            UserPoolId=self.pool_id, Username=username, TemporaryPassword="Temporary-1!", MessageAction="SUPPRESS"
        )
        if permanent:
            admin.admin_set_user_password(UserPoolId=self.pool_id, Username=username, Password=password, Permanent=True)
        for group in groups:
            with contextlib.suppress(admin.exceptions.GroupExistsException):
                admin.create_group(UserPoolId=self.pool_id, GroupName=group)
            admin.admin_add_user_to_group(UserPoolId=self.pool_id, Username=username, GroupName=group)

    def env(self, **credentials: str) -> dict[str, str]:
        """Environment for the export stage: the Cognito endpoint plus the given ANIML_* credentials."""
        return {"AWS_ENDPOINT_URL_COGNITO_IDENTITY_PROVIDER": self.url, **credentials}
