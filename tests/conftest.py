"""Shared fixtures: one Ray instance for the whole session, small corpora written to temporary files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Credentials for the S3-compatible test server (moto on 127.0.0.1). Set before Ray starts, so its workers inherit
# them as they would on a cloud node; the metadata lookup is off so nothing waits on an absent cloud.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "ember-test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "ember-test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

# Ray Train's controller polls its workers every 2 s by default; polling faster only makes the many short training
# runs of the suite notice their end (or a killed worker) sooner. Set before any Ray process starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EMBER = str(Path(sys.executable).with_name("ember"))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (token auth on, as Ray starts it by default)."""
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def sentences(n: int, seed: int = 0) -> list[str]:
    """Deterministic English-ish documents of varied length."""
    import random

    words = ("the model reads a corpus of text and learns to predict the next token from context while shards "
             "stream through memory mapped files on every rank of the cluster with exact resume after failure").split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 120))).capitalize() + "." for _ in range(n)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto in server mode) with one bucket: (bucket, host:port, boto3 client)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="ember-corpus")
    yield "ember-corpus", f"127.0.0.1:{port}", client
    server.stop()
