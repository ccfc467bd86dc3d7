"""Session fixtures: a private JACK dummy server (a real clocked audio device), shared paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus" / "symbtr8"
JACK_SR = 22050
JACK_PERIOD = 256


def _need(reason: str):
    """Skip outside CI; in CI a missing prerequisite is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must have this: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def jack_server():
    """Start ``jackd -d dummy`` under a unique name, export JACK_DEFAULT_SERVER, stop it by PID."""
    jackd = shutil.which("jackd")
    if jackd is None:
        _need("jackd is not installed (make test installs it: apt-get install jackd2)")
    name = f"tarab-test-{os.getpid()}"
    log = open(REPO / ".pytest_cache" / f"{name}.log", "w") if (REPO / ".pytest_cache").is_dir() else subprocess.DEVNULL
    proc = subprocess.Popen([jackd, "-n", name, "-R", "-d", "dummy", "-r", str(JACK_SR), "-p", str(JACK_PERIOD)],
                            stdout=log, stderr=subprocess.STDOUT)
    env = dict(os.environ, JACK_DEFAULT_SERVER=name)
    ok = subprocess.run(["jack_wait", "-w", "-t", "10"], env=env, capture_output=True).returncode == 0
    if not ok or proc.poll() is not None:
        proc.kill()
        pytest.fail(f"jackd dummy server {name} did not start")
    old = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    yield name
    if old is None:
        os.environ.pop("JACK_DEFAULT_SERVER", None)
    else:
        os.environ["JACK_DEFAULT_SERVER"] = old
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def jack_probe(jack_server):
    from jackio import JackProbe

    probe = JackProbe()
    yield probe
    probe.close()


@pytest.fixture(scope="session")
def corpus():
    if not (CORPUS / "manifest.csv").is_file():
        _need(f"the corpus is not at {CORPUS}")
    return CORPUS


def run_cli(*args, env=None, timeout=300, input=None):
    """Run ``python -m realtime.cli ARGS`` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "realtime.cli", *map(str, args)], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=timeout, input=input)


sys.path.insert(0, str(Path(__file__).resolve().parent))
