"""A real TensorBoard server on 127.0.0.1 serves gradwatch's run, scalar tags and findings text."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from gradwatch.demo import run_demo

STARTUP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read().decode())


@pytest.fixture
def tensorboard_server(tmp_path):
    logdir = tmp_path / "logs"
    run_demo("missing-zero-grad", logdir / "demo")
    port = _free_port()
    binary = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    server = subprocess.Popen(
        [binary, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                if "demo" in _get(f"{base}/data/runs"):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the run in time: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_tensorboard_serves_the_run_tags_and_findings(tensorboard_server):
    base = tensorboard_server
    assert "demo" in _get(f"{base}/data/runs")
    tags = _get(f"{base}/data/plugin/scalars/tags")["demo"]
    assert {"lifecycle/backward_passes_per_step", "grad_norm/weight", "grad_norm/bias", "lifecycle/findings"} <= set(
        tags
    )
    points = _get(f"{base}/data/plugin/scalars/scalars?run=demo&tag=lifecycle/backward_passes_per_step")
    assert [(p[1], p[2]) for p in points] == [(0, 2.0), (1, 2.0), (2, 2.0), (3, 2.0)]
    texts = _get(f"{base}/data/plugin/text/text?run=demo&tag=gradwatch/findings/text_summary")
    assert any("uncleared-gradient" in t["text"] for t in texts)
