import os
import random
import socket

import pytest

# Keep DDS traffic on this machine and away from other test runs.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(random.Random(os.getpid()).randint(1, 100))


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket="fleet")
    yield url
    server.stop()
