"""The S3 client of the ops room (boto3): its endpoint and credentials given by the caller."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployments.services import StackError


def _client(url: str, creds: Mapping[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def s3_ready(url: str, creds: Mapping[str, str]) -> bool:
    """S3's health check: a signed request that lists the buckets."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _client(url, creds).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def ensure_bucket(url: str, creds: Mapping[str, str], bucket: str) -> None:
    """Create the bucket if needed; bad credentials or no server: an error naming the endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = _client(url, creds)
    try:
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in names:
            client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise StackError(
            f"S3 at {url} refused the request ({err.get('Code')}: {err.get('Message')}); "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        ) from None
    except BotoCoreError as exc:
        raise StackError(f"S3 at {url} is unreachable ({exc})") from None


def list_objects(url: str, creds: Mapping[str, str], bucket: str, prefix: str = "") -> list[str]:
    """Every key under `prefix` (for checks and tests)."""
    client = _client(url, creds)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys
