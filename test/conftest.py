import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Keep DDS traffic on this machine and away from other test runs.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(random.Random(os.getpid()).randint(1, 100))


def pytest_sessionstart(session):
    session.started = time.monotonic()


def pytest_sessionfinish(session, exitstatus):
    """Fast DDS segments of the nodes tests killed are removed (they stay in /dev/shm, in RAM, otherwise). With
    OWLED_SUITE_RESULTS=path (`make bench`): the suite's size, outcomes and duration, for the docs."""
    subprocess.run([str(Path(sys.executable).parent / "fastdds"), "shm", "clean"], capture_output=True, timeout=60)
    path = os.environ.get("OWLED_SUITE_RESULTS")
    if not path:
        return
    from owled_ros.eval.machine import cpu

    outcomes = session.config.pluginmanager.get_plugin("terminalreporter").stats
    seconds = time.monotonic() - session.started
    summary = {"tests": session.testscollected, "seconds": round(seconds), "minutes": round(seconds / 60),
               **{outcome: len(outcomes.get(outcome, [])) for outcome in ("passed", "failed", "skipped", "error")},
               "cpu": cpu()}
    Path(path).write_text(json.dumps(summary, indent=1))


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
