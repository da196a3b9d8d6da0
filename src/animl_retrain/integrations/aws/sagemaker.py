"""SageMaker serverless endpoint and SSM parameter for a packaged classifier, changed without downtime.

Each deployment creates a SageMaker *model* and *endpoint configuration* under a new versioned name
(``<model id>-<stage>-v<version>-<UTC time>``) and points the stable endpoint (``<model id>-<stage>``) at it:
``CreateEndpoint`` the first time, ``UpdateEndpoint`` afterwards. SageMaker keeps serving the previous
configuration until the new one is in service (and rolls back if it fails), so Animl never sees the endpoint
go away; the previous configuration is kept for a manual roll-back. The endpoint name is written to the SSM
parameters Animl's API reads (``/ml/<model id>-realtime-endpoint-<stage>``, optionally ``-batch-``).

Endpoints come from the environment as boto3 reads them (``AWS_ENDPOINT_URL_SAGEMAKER``,
``AWS_ENDPOINT_URL_SSM``, ...), never from pipeline parameters. Credentials for Animl's account come from
:data:`DEPLOY_KEYS` when they are set (the ``animl-aws-deploy`` Secret), else from boto3's usual chain (IRSA, a
profile): under their own names, so they never take the place of the pod's own AWS identity for anything else
(KFP's launcher moves the task's artifacts with that one).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from animl_retrain.core import storage
from animl_retrain.core.errors import PipelineError
from animl_retrain.core.logging import log

BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting", "UpdateRollbackFailed")
_NAME = re.compile(r"[^a-zA-Z0-9-]+")


def sagemaker_name(*parts: str, limit: int = 63) -> str:
    """A valid SageMaker resource name (letters, digits and single hyphens, at most 63 characters)."""
    name = re.sub("-+", "-", _NAME.sub("-", "-".join(parts))).strip("-")
    return name[:limit].rstrip("-")


def ssm_parameter(model_id: str, kind: str, stage: str) -> str:
    """The SSM parameter Animl's API reads for an endpoint: ``/ml/<model id>-<kind>-endpoint-<stage>``."""
    return f"/ml/{model_id}-{kind}-endpoint-{stage}"


@dataclass
class Target:
    """What the endpoint should serve after the deployment."""

    endpoint: str
    versioned_name: str
    model_data: str
    image: str
    role_arn: str
    memory_mb: int
    max_concurrency: int
    ssm_names: list[str]
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, model_id: str, stage: str, version: str, **kwargs: Any) -> Target:
        """Names for a new deployment of ``model_id`` version ``version`` to ``stage``."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return cls(
            endpoint=sagemaker_name(model_id, stage),
            versioned_name=sagemaker_name(model_id, stage, f"v{version}", stamp),
            **kwargs,
        )


DEPLOY_KEYS = ("ANIML_DEPLOY_AWS_ACCESS_KEY_ID", "ANIML_DEPLOY_AWS_SECRET_ACCESS_KEY", "ANIML_DEPLOY_AWS_REGION")


def session():
    """A boto3 session in Animl's account: the ``ANIML_DEPLOY_AWS_*`` keys when set, else boto3's own chain."""
    import boto3

    env = os.environ
    region = env.get("ANIML_DEPLOY_AWS_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-west-2"
    if env.get("ANIML_DEPLOY_AWS_ACCESS_KEY_ID"):
        return boto3.session.Session(
            aws_access_key_id=env["ANIML_DEPLOY_AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env.get("ANIML_DEPLOY_AWS_SECRET_ACCESS_KEY", ""),
            region_name=region,
        )
    return boto3.session.Session(region_name=region)


def clients():
    """boto3 SageMaker and SSM clients in Animl's account, with bounded retries and timeouts."""
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=30, read_timeout=60)
    aws = session()
    return aws.client("sagemaker", config=config), aws.client("ssm", config=config)


def model_bucket_client():
    """An S3 client for the model bucket, in Animl's account like :func:`clients`."""
    return storage.s3_client(session=session())


def _code(e: Exception) -> str:
    return getattr(e, "response", {}).get("Error", {}).get("Code", "")


def current_state(sm, ssm, target: Target) -> dict[str, Any]:
    """The endpoint's status and configuration now, and the SSM parameters' values (None where absent)."""
    from botocore.exceptions import ClientError

    state: dict[str, Any] = {"endpoint_status": None, "endpoint_config": None, "ssm": {}}
    try:
        described = sm.describe_endpoint(EndpointName=target.endpoint)
        state["endpoint_status"] = described["EndpointStatus"]
        state["endpoint_config"] = described["EndpointConfigName"]
    except ClientError as e:
        if _code(e) != "ValidationException":  # SageMaker's answer for "no such endpoint"
            raise
    for name in target.ssm_names:
        try:
            state["ssm"][name] = ssm.get_parameter(Name=name)["Parameter"]["Value"]
        except ClientError as e:
            if _code(e) != "ParameterNotFound":
                raise
            state["ssm"][name] = None
    return state


def plan(target: Target, state: dict[str, Any] | None) -> list[str]:
    """What :func:`apply` will change, one line per action."""
    lines = [
        f"create SageMaker model {target.versioned_name} (image {target.image}, model data {target.model_data})",
        f"create endpoint config {target.versioned_name}: serverless, {target.memory_mb} MB, "
        f"max concurrency {target.max_concurrency}",
    ]
    if state is None:
        lines.append(f"create or update endpoint {target.endpoint} (its current state could not be read)")
    elif state["endpoint_status"] is None:
        lines.append(f"create endpoint {target.endpoint}")
    else:
        lines.append(
            f"update endpoint {target.endpoint} ({state['endpoint_status']}) from config "
            f"{state['endpoint_config']} to {target.versioned_name}, without downtime"
        )
    for name in target.ssm_names:
        old = None if state is None else state["ssm"].get(name)
        if old == target.endpoint:
            lines.append(f"keep SSM parameter {name} = {target.endpoint}")
        else:
            lines.append(f"set SSM parameter {name} = {target.endpoint} (was {old if state else 'unknown'})")
    return lines


def wait_in_service(sm, endpoint: str, timeout_s: float, poll_s: float = 15.0) -> str:
    """Poll until the endpoint is InService (returns the status) or Failed/timed out (raises PipelineError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = sm.describe_endpoint(EndpointName=endpoint)
        status = described["EndpointStatus"]
        if status == "InService":
            return status
        if status in ("Failed", "UpdateRollbackFailed") or (status == "RollingBack"):
            raise PipelineError(
                f"endpoint {endpoint} is {status}: {described.get('FailureReason', 'no reason given')}; "
                f"it keeps serving {described.get('EndpointConfigName')}"
            )
        if time.monotonic() >= deadline:
            raise PipelineError(f"endpoint {endpoint} still {status} after {timeout_s:.0f} s; check it in SageMaker")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def apply(sm, ssm, target: Target, state: dict[str, Any], wait_s: float) -> dict[str, Any]:
    """Create the versioned model and config, create or update the endpoint, write the SSM parameters."""
    status = state["endpoint_status"]
    if status in BUSY:
        raise PipelineError(f"endpoint {target.endpoint} is {status}; deploy again once it is InService")
    if status == "Failed":
        raise PipelineError(
            f"endpoint {target.endpoint} is Failed and cannot be updated; delete it in SageMaker, then deploy again"
        )
    tags = [{"Key": k, "Value": v} for k, v in target.tags.items()]
    sm.create_model(
        ModelName=target.versioned_name,
        ExecutionRoleArn=target.role_arn,
        PrimaryContainer={"Image": target.image, "ModelDataUrl": target.model_data},
        Tags=tags,
    )
    sm.create_endpoint_config(
        EndpointConfigName=target.versioned_name,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": target.versioned_name,
                "ServerlessConfig": {"MemorySizeInMB": target.memory_mb, "MaxConcurrency": target.max_concurrency},
            }
        ],
        Tags=tags,
    )
    if status is None:
        sm.create_endpoint(EndpointName=target.endpoint, EndpointConfigName=target.versioned_name, Tags=tags)
        action = "created"
    else:
        sm.update_endpoint(EndpointName=target.endpoint, EndpointConfigName=target.versioned_name)
        action = "updated"
    log.info("deploy: endpoint %s %s with config %s", target.endpoint, action, target.versioned_name)
    final = wait_in_service(sm, target.endpoint, wait_s) if wait_s > 0 else "not waited for"
    for name in target.ssm_names:
        ssm.put_parameter(Name=name, Value=target.endpoint, Type="String", Overwrite=True)
    return {"action": action, "status": final, "previous_config": state["endpoint_config"]}
