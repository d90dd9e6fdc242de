"""benchmarks/cluster.py: the emulated multi-node cluster (network namespaces + tc + torchrun).

The end-to-end run needs root and network namespaces; it is skipped with the
reason from `check_can_run()` elsewhere. It is the slow part (~15 s on 2 cores:
two torchruns and two ranks import torch) and carries its own timeout mark.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "benchmarks" / "cluster.py"
SMOKE = ROOT / "benchmarks" / "cluster_smoke.py"


def _load_cluster():
    spec = importlib.util.spec_from_file_location("mfx_cluster", CLUSTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cluster = _load_cluster()
CANNOT_RUN = cluster.check_can_run()
needs_netns = pytest.mark.skipif(CANNOT_RUN is not None, reason=f"emulated cluster unavailable: {CANNOT_RUN}")


def test_units():
    assert cluster.parse_rate("1gbit") == 10**9
    assert cluster.parse_rate("200mbit") == 200 * 10**6
    assert cluster.parse_rate("none") is None and cluster.parse_rate("unshaped") is None
    assert cluster.parse_duration("100us") == pytest.approx(1e-4)
    assert cluster.parse_duration("1ms") == pytest.approx(1e-3)
    with pytest.raises(Exception, match="bad rate"):
        cluster.parse_rate("fast")


def _unprivileged_python() -> list[str]:
    """A command prefix running a Python 3.8+ as nobody that can read cluster.py, or skip."""
    if os.geteuid() != 0:
        return [sys.executable]  # already unprivileged
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not found: cannot drop privileges")
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # sys.executable may sit under /root (mode 700); cluster.py needs only the standard library.
    for python in (sys.executable, "/usr/bin/python3"):
        probe = [*drop, python, "-c", f"import sys; open({str(CLUSTER)!r}); assert sys.version_info >= (3, 8)"]
        if os.path.exists(python) and subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return [*drop, python]
    pytest.skip("no Python that user nobody can run and that can read benchmarks/cluster.py")


def test_non_root_gets_a_clear_error():
    cmd = [*_unprivileged_python(), str(CLUSTER), "--nodes", "2", "--ranks-per-node", "1", "--", str(SMOKE)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tempfile.gettempdir())
    assert proc.returncode == cluster.EXIT_CANNOT_RUN, proc.stderr
    assert "must run as root" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one clear line, no traceback
    assert time.monotonic() - start < 10


def _namespaces_of(pid: int) -> list[str]:
    return [ns for ns in cluster.list_namespaces() if ns.startswith(f"{cluster.PREFIX}{pid}-")]


@needs_netns
@pytest.mark.timeout(150)
def test_two_nodes_run_the_smoke_workload_over_a_shaped_link():
    proc = subprocess.Popen([sys.executable, str(CLUSTER), "--nodes", "2", "--ranks-per-node", "1",
                             "--link", "1gbit", "--latency", "100us", "--timeout", "120", "--", str(SMOKE)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=140)
    finally:
        if proc.poll() is None:
            proc.terminate()  # cluster.py tears down on SIGTERM
            proc.wait(timeout=30)
    assert proc.returncode == 0, out + err
    for rank in range(2):
        assert any(f"rank {rank}/2 node=" in line and " ok steps=3" in line for line in out.splitlines()), out
    assert re.search(r"cluster: links: (htb|tbf) rate 1gbit", err), err  # shaped, never silently not
    assert _namespaces_of(proc.pid) == []


@needs_netns
def test_cleanup_removes_leftovers_of_a_killed_run():
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names a run that was killed
    leftover = f"{cluster.PREFIX}{dead.pid}-n0"
    alive = f"{cluster.PREFIX}{os.getpid()}-n0"  # our own pid: a run still going, to be left alone
    logs = tempfile.mkdtemp(prefix=f"{cluster.PREFIX}{dead.pid}-logs-")
    sleeper = None
    try:
        for ns in (leftover, alive):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        # a process stranded in the leftover namespace, as a worker of a SIGKILLed run would be
        sleeper = subprocess.Popen(["ip", "netns", "exec", leftover, "sleep", "30"])
        deadline = time.monotonic() + 5
        while not cluster.namespace_pids(leftover) and time.monotonic() < deadline:
            time.sleep(0.05)

        proc = subprocess.run([sys.executable, str(CLUSTER), "--cleanup"], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert leftover in proc.stderr
        names = cluster.list_namespaces()
        assert leftover not in names and alive in names
        assert sleeper.wait(timeout=5) != 0  # killed
        assert not os.path.exists(logs)
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
        for ns in (leftover, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(logs, ignore_errors=True)
