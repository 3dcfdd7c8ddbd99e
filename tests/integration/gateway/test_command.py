"""``tfpool gateway`` as a process: it says where it listens, serves, and stops on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
from typing import IO, cast

import requests

from tests.integration.helpers import TFPOOL


def test_the_command_serves_until_sigterm(redis_url: str) -> None:
    ports = ["--grpc-port", "0", "--rest-port", "0"]
    process = subprocess.Popen(
        [*TFPOOL, "gateway", "--redis-url", redis_url, "--host", "127.0.0.1", *ports],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = cast(IO[str], process.stdout).readline()
        match = re.search(r"gRPC on port (\d+), REST on port (\d+)", line)
        assert match, line + (process.stderr.read() if process.stderr else "")
        with requests.get(f"http://127.0.0.1:{match[2]}/v2/health/ready", timeout=10) as ready:
            assert ready.status_code == 200 and ready.json() == {"ready": True}
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)  # drains the pipes while it stops
        assert process.returncode == 0, err[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
