"""The package as a user installs it: a wheel built from the repository, installed into a fresh
virtual environment outside the checkout, runs `facedist serve`, which answers /v1/health.

The venv reuses this interpreter's installed dependencies (a .pth line to their site-packages:
no download, nothing of the checkout) and gets the wheel with --no-deps. Nothing from the
repository is on its sys.path: no PYTHONPATH, and it runs from a temporary folder.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from support.fixtures import free_port

httpx = pytest.importorskip("httpx")

from facedist.extractors import DEFAULT_BACKEND  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.ray]



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """facedist-*.whl built offline from a copy of the sources (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "facedist", source / "facedist", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=300)
    wheels = list(out.glob("facedist-*.whl"))
    if built.returncode != 0 or not wheels:
        pytest.skip(f"cannot build the wheel offline: {built.stderr.strip()[-500:]}")
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and this interpreter's dependencies."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(root)],
                   check=True, timeout=120)
    python = root / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies, not facedist: a plain path line, so the .pth files there (an editable
    # facedist among them) are not run.
    (site_packages / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return root


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    return env


def test_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    found = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import facedist, facedist.serving, sys; print(facedist.__file__); print(sys.path)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_clean_env(), check=True).stdout
    location, path = found.splitlines()
    assert Path(location).is_relative_to(venv), location
    # The one entry under the checkout allowed is the dependencies' site-packages (deps.pth).
    deps = sysconfig.get_path("purelib")
    entries = [e for e in ast.literal_eval(path) if e and e != deps]
    assert not [e for e in entries if Path(e).resolve().is_relative_to(REPO)], entries


def test_the_wheel_ships_the_default_texture_basis(wheel, venv, tmp_path):
    """The basis is package data: in the wheel, and what the installed package resolves (from
    its own folder, the sha256 pin checked) when the model dir holds no texture/."""
    import zipfile

    from facedist import assets

    spec = assets.MODEL_FILES[assets.DEFAULT_TEXTURE_BASIS_FILE]
    with zipfile.ZipFile(wheel) as archive:
        assert {f"facedist/{spec.packaged}", "facedist/data/README.md"} <= set(archive.namelist())  # + its credit
    env = {**_clean_env(), assets.MODEL_DIR_ENV: str(tmp_path), assets.CACHE_DIR_ENV: str(tmp_path / "cache")}
    code = "from facedist import assets; print(assets.resolve(assets.DEFAULT_TEXTURE_BASIS_FILE))"
    found = Path(subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                                cwd=tmp_path, env=env, check=True).stdout.strip())
    assert found.is_relative_to(venv) and assets.sha256_of(found) == spec.sha256


def test_facedist_serve_from_the_wheel_answers_health(venv, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(venv / "bin" / "facedist"), "serve", "--port", str(port)],
                                   cwd=tmp_path, env=_clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600  # a deadline for start-up on a loaded machine, not a measurement
        health = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=10)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert health is not None and health.status_code == 200, log.read_text()[-3000:]
        body = health.json()
        assert body["status"] == "ok" and body["extractor"] == DEFAULT_BACKEND
        assert body["recognizer"] == "not_configured"
    finally:
        process.send_signal(signal.SIGTERM)  # run_server shuts Serve and its local Ray down
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
