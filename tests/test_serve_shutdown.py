"""`facedist serve` stops on SIGINT and on SIGTERM: exit 0, one line saying so, no error lines.

One real command per case (a local Ray each, the app, real HTTP), the three started together so
their start-ups overlap; each test has one photo extracted by its own, then sends the signal:
SIGINT to the whole process group, as Ctrl-C in a terminal does (Ray's own processes get it too,
and block it), SIGTERM to the process alone, as `docker stop` and Kubernetes do, and SIGTERM to
the whole group, as systemd does by default (Ray's processes die of it, so the graceful part is
cut short). The wait for the exit is bounded generously (a hang fails; how fast it stops on this
machine is printed, and benchmarks/ does not time it: the machine decides that)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.faces import GEOMETRY_ONLY_FLAGS
from support.fixtures import free_ports

httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


CASES = {"SIGINT-to-the-group": (signal.SIGINT, True), "SIGTERM-to-the-process": (signal.SIGTERM, False),
         "SIGTERM-to-the-group": (signal.SIGTERM, True)}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One `facedist serve` per case, all started at once (their start-ups overlap): {case: (process, port)}."""
    ports = free_ports(len(CASES))
    started = {}
    try:
        for case, port in zip(CASES, ports):
            folder = tmp_path_factory.mktemp(case)
            env = {**os.environ, "FACEDIST_RAY_LOG": str(folder / "ray.log"),
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            env.pop("FACEDIST_API_TOKEN", None)
            env.pop("RAY_ADDRESS", None)
            command = [sys.executable, "-m", "facedist.cli", "serve", "--port", str(port), "--num-replicas", "1",
                       "--extractor-num-cpus", "0.5", *GEOMETRY_ONLY_FLAGS]
            # Its own session: the group signal reaches it and Ray's processes, not pytest.
            started[case] = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env, start_new_session=True, cwd=folder), port)
        yield started
    finally:
        for process, _ in started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.parametrize("case", list(CASES))
def test_facedist_serve_stops_on_a_signal(case, servers, yale_dir):
    signum, to_group = CASES[case]
    process, port = servers[case]
    first = process.stdout.readline()  # "facedist serving on ..." once the app is up
    assert "serving on" in first, first + process.stderr.read()
    answer = httpx.post(f"http://127.0.0.1:{port}/v1/extract", timeout=120,
                        files={"image": ("subject01.normal", (yale_dir / "subject01.normal").read_bytes())})
    assert answer.status_code == 200, answer.text
    sent = time.monotonic()
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    print(f"{case}: exited {process.returncode} after {time.monotonic() - sent:.1f} s")
    assert process.returncode == 0, (out, err)
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(rf"facedist: {signal.Signals(signum).name}: stopped in [\d.]+ s", lines[0]), out
    # stderr holds only the start-up line (where Ray's logs go): no error, no traceback, no retry.
    others = [line for line in err.splitlines() if line.strip() and not line.startswith("facedist: starting a local Ray")]
    assert not others, err
