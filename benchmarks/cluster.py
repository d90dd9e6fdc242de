#!/usr/bin/env python3
"""Emulate a multi-node cluster on one Linux machine and run torchrun on it.

    python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 1gbit --latency 100us -- script.py [args]

Every node is a network namespace (mfx-<pid>-n<i>, address 10.213.0.<i+1>/24)
joined by a veth pair to a bridge that lives in a "switch" namespace of its own
(mfx-<pid>-sw), so the host's interfaces, routes and firewall are never
touched. Ranks of one node talk over loopback; ranks of different nodes cross
the bridge, whose links are shaped with tc on both ends: htb (or tbf) for the
rate and netem for the latency when the kernel has it. One torchrun per node
is started inside its namespace, as on a real cluster, with c10d rendezvous
on node 0. Everything made is removed on exit, error, Ctrl-C or SIGTERM;
namespaces left by a SIGKILLed run are removed by the next run, or by
`--cleanup`.

Standard library only: --cleanup and --selftest must work without torch.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

PREFIX = "mfx-"  # every namespace this script makes starts with it: leftovers are found by it
SUBNET = "10.213.0"  # private range, only ever configured inside our namespaces
BRIDGE = "mfx-br"

EXIT_CANNOT_RUN = 77  # not root, no netns support, no ip/tc (77: "skip", apart from argparse's 2)
EXIT_SHAPING = 3  # the asked-for shaping cannot be applied (and we may not degrade)
EXIT_TIMEOUT = 124  # like timeout(1)

# one-way bytes of the --selftest transfer and its time bound
SELFTEST_BYTES = 8 << 20
SELFTEST_SECONDS = 10.0


class ClusterError(Exception):
    """A failure with a one-line message for the user and an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    """Raised in the main thread by SIGINT/SIGTERM/SIGHUP so that `finally` tears down."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def log(message: str) -> None:
    print(f"cluster: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- units


_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
               "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6, "ns": 1e-9}


def parse_rate(text: str) -> int | None:
    """'1gbit' -> 10**9 bits/s (tc's units: bit, kbit, mbit, gbit; *bps are bytes/s); None for no shaping."""
    if text.lower() in ("none", "unshaped", "0"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text.strip().lower())
    if not m or m.group(2) not in _RATE_UNITS:
        raise argparse.ArgumentTypeError(f"bad rate {text!r}: use e.g. 1gbit, 200mbit, 10gbit or none")
    bits = int(float(m.group(1)) * _RATE_UNITS[m.group(2)])
    if bits < 8000:
        raise argparse.ArgumentTypeError(f"rate {text!r} is too small")
    return bits


def parse_duration(text: str) -> float:
    """'100us' -> 1e-4 seconds; a bare number is microseconds, like tc."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip().lower())
    if not m or (m.group(2) and m.group(2) not in _TIME_UNITS):
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 100us, 1ms, 0")
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "us"]


def fmt_rate(bits: float | None) -> str:
    if bits is None:
        return "unshaped"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.4g}{unit}"
    return f"{bits:.0f}bit"


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}us"


# ----------------------------------------------------------------------------- ip / tc


def run_cmd(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a short command (ip, tc); on failure raise ClusterError with its stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd(["ip", *(["-n", ns] if ns else []), *args], check=check)


def tc(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cmd(["ip", "netns", "exec", ns, "tc", *args], check=check)


def node_ns(run_id: str, i: int) -> str:
    return f"{PREFIX}{run_id}-n{i}"


def switch_ns(run_id: str) -> str:
    return f"{PREFIX}{run_id}-sw"


def node_if(i: int) -> str:
    """The node's end of its veth pair; names live inside our namespaces, so they cannot clash with the host."""
    return f"mfx-n{i}"


def port_if(i: int) -> str:
    """The switch's end of node i's veth pair, a bridge port."""
    return f"mfx-s{i}"


def node_addr(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


# ----------------------------------------------------------------------------- leftovers


def list_namespaces() -> list[str]:
    """Our namespaces (by PREFIX) on this machine."""
    out = run_cmd(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def owner_pid(ns: str) -> int | None:
    m = re.match(re.escape(PREFIX) + r"(\d+)-", ns)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def namespace_pids(ns: str) -> list[int]:
    out = run_cmd(["ip", "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def kill_namespace_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM every process in `ns`, then SIGKILL what is left after `grace` seconds.

    torchrun starts its workers in sessions of their own, so killing torchrun's
    process group can miss them; everything inside our namespace is ours, though.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)


def remove_namespace(ns: str) -> None:
    """Kill what runs in `ns` and delete it (deleting a netns also deletes its veths, qdiscs and the bridge)."""
    if ns not in list_namespaces():
        return
    kill_namespace_processes(ns)
    ip("netns", "del", ns, check=False)


def cleanup_stale(verbose: bool = True) -> list[str]:
    """Remove namespaces (and torchrun log folders) of runs whose owner process is gone, e.g. SIGKILLed.

    Returns the namespaces' names. Those of a live run, named by its pid, are left alone.
    """
    stale = [ns for ns in list_namespaces() if (pid := owner_pid(ns)) is None or not pid_alive(pid)]
    for ns in stale:
        remove_namespace(ns)
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), f"{PREFIX}*-logs-*")):
        if (pid := owner_pid(os.path.basename(folder))) is not None and not pid_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
    if stale and verbose:
        log(f"removed {len(stale)} leftover namespace(s) of a killed run: {' '.join(stale)}")
    return stale


# ----------------------------------------------------------------------------- can we run?


def check_can_run() -> str | None:
    """None if this machine can run the emulated cluster, else the reason in one line."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "must run as root: it creates network namespaces, veth pairs and tc qdiscs (try sudo)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2 (apt-get install -y iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    proc = run_cmd(["ip", "netns", "add", probe], check=False)
    run_cmd(["ip", "netns", "del", probe], check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace (ip netns add: {proc.stderr.strip()})"
    return None


def install_iproute2() -> None:
    """As root on Debian, fetch ip/tc when they are missing (told to the user first)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    if shutil.which("ip") and shutil.which("tc"):
        return
    log("ip/tc missing: installing Debian's iproute2 (apt-get install -y iproute2)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "iproute2"]):
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, timeout=600, check=False)


# ----------------------------------------------------------------------------- topology and shaping


@dataclass
class Shaping:
    rate: int | None  # bits/s, None: not rate-limited
    latency: float  # one-way node-to-node seconds
    jitter: float

    def describe_request(self) -> str:
        return f"rate {fmt_rate(self.rate)}, one-way latency {fmt_us(self.latency)} ± {fmt_us(self.jitter)}"


# What every created namespace is registered in *before* it exists, so teardown never misses one.
_CREATED: list[str] = []


def create_topology(run_id: str, nodes: int) -> None:
    """Switch namespace with a bridge; per node a namespace, lo up and a veth to the bridge."""
    sw = switch_ns(run_id)
    _CREATED.append(sw)
    ip("netns", "add", sw)
    ip("link", "add", BRIDGE, "type", "bridge", ns=sw)
    ip("link", "set", BRIDGE, "up", ns=sw)
    for i in range(nodes):
        ns = node_ns(run_id, i)
        _CREATED.append(ns)
        ip("netns", "add", ns)
        ip("link", "set", "lo", "up", ns=ns)
        # Made inside the node namespace with its peer put straight into the switch: never in the host's.
        ip("link", "add", node_if(i), "type", "veth", "peer", "name", port_if(i), "netns", sw, ns=ns)
        ip("addr", "add", f"{node_addr(i)}/24", "dev", node_if(i), ns=ns)
        ip("link", "set", node_if(i), "up", ns=ns)
        ip("link", "set", port_if(i), "master", BRIDGE, ns=sw)
        ip("link", "set", port_if(i), "up", ns=sw)


def qdisc_supported(ns: str, dev: str, *spec: str) -> bool:
    """Whether this kernel has the qdisc: try it as the root qdisc, then remove it again."""
    ok = tc(ns, "qdisc", "add", "dev", dev, "root", *spec, check=False).returncode == 0
    tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
    return ok


def shape_egress(ns: str, dev: str, rate: int | None, delay: float, jitter: float, rate_qdisc: str,
                 netem: bool) -> None:
    """Egress of one veth end: rate (htb class, or tbf) and then delay (netem), each when asked for."""
    burst = str(max(64 * 1024, rate // 8 // 1000)) if rate else ""  # >= one GSO packet and >= 1 ms of traffic
    netem_args = ["netem", "delay", f"{delay * 1e6:.0f}us"] + ([f"{jitter * 1e6:.0f}us"] if jitter else [])
    netem_args += ["limit", "100000"]  # netem's default of 1000 packets would drop at high rate x delay
    delayed = netem and (delay > 0 or jitter > 0)
    if rate and rate_qdisc == "htb":
        tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1")
        tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", str(rate),
           "ceil", str(rate), "burst", burst, "cburst", burst, "quantum", "60000")
        if delayed:
            tc(ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *netem_args)
    elif rate:  # tbf: no classes, but netem can hang below it
        tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", str(rate), "burst", burst,
           "latency", "50ms")
        if delayed:
            tc(ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *netem_args)
    elif delayed:
        tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "10:", *netem_args)


def apply_shaping(run_id: str, nodes: int, shaping: Shaping, strict: bool) -> dict[str, str]:
    """Shape both directions of every node link; returns the MOEFLUX_CLUSTER_* facts of what was applied.

    A packet between two nodes leaves the sender's veth and then the receiver's
    bridge port, so each of those two egresses gets the full rate and half of
    the one-way latency (and of the jitter).
    """
    sw = switch_ns(run_id)
    probe_dev = port_if(0)
    want_delay = shaping.latency > 0 or shaping.jitter > 0
    rate_qdisc = ""
    if shaping.rate:  # htb, else tbf (no classes, same token bucket)
        candidates = {"htb": ["htb"], "tbf": ["tbf", "rate", "1gbit", "burst", "64k", "latency", "50ms"]}
        rate_qdisc = next((q for q, spec in candidates.items() if qdisc_supported(sw, probe_dev, *spec)), "")
        if not rate_qdisc:
            raise ClusterError(f"cannot rate-limit to {fmt_rate(shaping.rate)}: this kernel has neither the htb "
                               f"nor the tbf qdisc; use --link none", EXIT_SHAPING)
    netem = want_delay and qdisc_supported(sw, probe_dev, "netem", "delay", "1ms")
    if want_delay and not netem and shutil.which("modprobe"):  # a modular kernel may just not have loaded it
        run_cmd(["modprobe", "-q", "sch_netem"], check=False)
        netem = qdisc_supported(sw, probe_dev, "netem", "delay", "1ms")
    if want_delay and not netem:
        what = f"--latency {fmt_us(shaping.latency)}"
        what += f" --jitter {fmt_us(shaping.jitter)}" if shaping.jitter else ""
        if strict:
            raise ClusterError(f"cannot emulate {what}: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM); "
                               f"drop --strict to run with rate shaping only", EXIT_SHAPING)
        log(f"WARNING: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM is off), so {what} is NOT emulated: "
            f"links get only the rate limit ({fmt_rate(shaping.rate)}) and the natural veth latency "
            f"(see --selftest); pass --strict to refuse instead")
    for i in range(nodes):
        for ns, dev in ((node_ns(run_id, i), node_if(i)), (sw, port_if(i))):
            shape_egress(ns, dev, shaping.rate, shaping.latency / 2, shaping.jitter / 2, rate_qdisc, netem)

    applied = []
    if shaping.rate:
        applied.append(f"{rate_qdisc} rate {fmt_rate(shaping.rate)}")
    if netem:
        applied.append(f"netem delay {fmt_us(shaping.latency / 2)} ± {fmt_us(shaping.jitter / 2)} per hop (2 hops)")
    elif want_delay:
        applied.append("latency not emulated (no netem in this kernel)")
    description = "; ".join(applied) or "unshaped"
    log(f"links: {description}")
    return {
        "MOEFLUX_CLUSTER_LINK": fmt_rate(shaping.rate) if shaping.rate else "none",
        "MOEFLUX_CLUSTER_LATENCY": fmt_us(shaping.latency),
        "MOEFLUX_CLUSTER_JITTER": fmt_us(shaping.jitter),
        "MOEFLUX_CLUSTER_LATENCY_EMULATED": "1" if netem or not want_delay else "0",
        "MOEFLUX_CLUSTER_SHAPING": description,
    }


# ----------------------------------------------------------------------------- processes


_PROCS: list[subprocess.Popen] = []
_OUTPUT_LOCK = threading.Lock()


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when this script dies, even by SIGKILL.

    Resolved in the parent (_PRCTL) so that the forked child only makes one call.
    """
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_in_namespace(ns: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_die_with_parent)
    _PROCS.append(proc)
    return proc


def pump(stream, out, prefix: bytes) -> threading.Thread:
    """Copy `stream` to `out` line by line with `prefix` (a thread; ends at EOF)."""

    def copy() -> None:
        for line in iter(stream.readline, b""):
            with _OUTPUT_LOCK:
                out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                out.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM the process groups of the running `procs`, SIGKILL them after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [p for p in procs if p.poll() is None]
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline and any(p.poll() is None for p in running):
            time.sleep(0.05)


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal n -> 128 + n, as shells do


def torchrun_argv(args: argparse.Namespace, run_id: str, i: int, log_dir: str) -> list[str]:
    """torchrun for node i, exactly as one would type it on node i of a real cluster."""
    # c10d rendezvous: node 0 hosts the store; is_host says so explicitly because torchrun's guess
    # (compare the endpoint with this machine's hostname/IPs) sees the host's name, not the namespace's.
    # --local-addr: the address other nodes reach this node at (MASTER_ADDR when it gets rank 0);
    # torchrun's default, the FQDN, resolves to the host's address, which does not exist in a namespace.
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(args.nodes), "--nproc-per-node", str(args.ranks_per_node), "--node-rank", str(i),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{node_addr(0)}:{args.port}",
            "--rdzv-id", f"{PREFIX}{run_id}",
            "--rdzv-conf", f"is_host={int(i == 0)},join_timeout={args.join_timeout}",
            "--local-addr", node_addr(i), "--max-restarts", "0",
            "--tee", "3", "--log-dir", os.path.join(log_dir, f"n{i}"), "--log-line-prefix-template", "[r${rank}] ",
            *args.command]


def node_env(args: argparse.Namespace, i: int, facts: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)  # the host's, if any, would contradict torchrun's
    env.update(facts)
    env.update({
        # gloo binds the node's own address; a peer on the same node is then reached over loopback.
        "GLOO_SOCKET_IFNAME": node_if(i), "TP_SOCKET_IFNAME": node_if(i), "NCCL_SOCKET_IFNAME": node_if(i),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MOEFLUX_CLUSTER_NODE": str(i),
        "MOEFLUX_CLUSTER_NODES": str(args.nodes),
        "MOEFLUX_CLUSTER_RANKS_PER_NODE": str(args.ranks_per_node),
        "MOEFLUX_CLUSTER_ADDR": node_addr(i),
    })
    return env


def run_torchruns(args: argparse.Namespace, run_id: str, facts: dict[str, str], deadline: float) -> int:
    """One torchrun per node; returns 0, the first failing torchrun's exit code, or EXIT_TIMEOUT."""
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{run_id}-logs-") as log_dir:
        procs = [start_in_namespace(node_ns(run_id, i), torchrun_argv(args, run_id, i, log_dir),
                                    node_env(args, i, facts))
                 for i in range(args.nodes)]
        log(f"started {args.nodes} torchrun(s) x {args.ranks_per_node} rank(s): "
            + shlex.join(["torchrun", *torchrun_argv(args, run_id, 0, log_dir)[3:]]).replace(log_dir, "<tmp>"))
        threads = [pump(stream, out, f"[n{i}] ".encode())
                   for i, p in enumerate(procs)
                   for stream, out in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer))]
        code = 0
        while True:
            states = [p.poll() for p in procs]
            failed = [(i, rc) for i, rc in enumerate(states) if rc not in (None, 0)]
            if failed:
                i, rc = failed[0]
                code = exit_code(rc)
                log(f"node {i}'s torchrun exited with {code}; stopping the other nodes")
                break
            if all(rc == 0 for rc in states):
                break
            if time.monotonic() > deadline:
                log(f"--timeout {args.timeout:g}s reached; stopping all nodes")
                code = EXIT_TIMEOUT
                break
            time.sleep(0.1)
        stop(procs, grace=args.grace)
        for t in threads:
            t.join(timeout=2)  # the rest of their output; bounded in case a grandchild holds the pipe
        return code


# ----------------------------------------------------------------------------- selftest


def selftest_server(addr: str, port: int) -> None:
    """Runs in node 1: echo 1-byte pings, then swallow a sized transfer and acknowledge it."""
    with socket.create_server((addr, port)) as server:
        server.settimeout(SELFTEST_SECONDS + 5)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(SELFTEST_SECONDS + 5)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (op := conn.recv(1)) == b"p":
                conn.sendall(b"p")
            if op != b"t":
                return
            size = int.from_bytes(_recv_exactly(conn, 8), "big")
            view = memoryview(bytearray(1 << 20))
            while size > 0:
                n = conn.recv_into(view, min(size, len(view)))
                if not n:
                    return
                size -= n
            conn.sendall(b"d")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


def selftest_client(addr: str, port: int, nbytes: int) -> None:
    """Runs in node 0: RTT of 1-byte ping-pongs, then throughput of `nbytes`; prints one JSON line."""
    deadline = time.monotonic() + 5
    while True:  # the server may not listen yet
        try:
            conn = socket.create_connection((addr, port), timeout=SELFTEST_SECONDS)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        end = time.monotonic() + 2
        while len(rtts) < 500 and time.monotonic() < end:
            t = time.perf_counter()
            conn.sendall(b"p")
            _recv_exactly(conn, 1)
            rtts.append(time.perf_counter() - t)
        payload = memoryview(bytearray(1 << 20))
        conn.sendall(b"t" + nbytes.to_bytes(8, "big"))
        t = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= conn.send(payload[:min(left, len(payload))])
        _recv_exactly(conn, 1)
        seconds = time.perf_counter() - t
    print(json.dumps({"rtts": rtts, "bytes": nbytes, "seconds": seconds}), flush=True)


def run_selftest(args: argparse.Namespace, run_id: str, shaping: Shaping, facts: dict[str, str]) -> None:
    """Measure TCP RTT and throughput node 0 -> node 1 and print them next to the configuration."""
    if args.nodes < 2:
        raise ClusterError("--selftest needs --nodes 2 or more")
    me = [sys.executable, os.path.abspath(__file__)]
    port = args.port + 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = start_in_namespace(node_ns(run_id, 1), [*me, "--selftest-role", "server", node_addr(1), str(port)], env)
    client = start_in_namespace(node_ns(run_id, 0), [*me, "--selftest-role", "client", node_addr(1), str(port),
                                                     str(args.selftest_mb << 20)], env)
    try:
        out, err = client.communicate(timeout=SELFTEST_SECONDS + 10)
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        raise ClusterError("--selftest timed out")
    finally:
        stop([server, client], grace=1)
    if client.returncode != 0:
        raise ClusterError(f"--selftest failed: {err.decode().strip().splitlines()[-1:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    rtts = sorted(result["rtts"])
    bits_per_s = result["bytes"] * 8 / result["seconds"]
    emulated = facts["MOEFLUX_CLUSTER_LATENCY_EMULATED"] == "1"
    want_rtt = f"{fmt_us(2 * shaping.latency)} + base" if emulated and shaping.latency else "base only"
    print(f"selftest n0 -> n1: throughput {bits_per_s / 1e6:.0f} Mbit/s ({result['bytes'] >> 20} MiB in "
          f"{result['seconds'] * 1e3:.1f} ms), configured {fmt_rate(shaping.rate)}", flush=True)
    print(f"selftest n0 <-> n1: TCP RTT median {fmt_us(statistics.median(rtts))} min {fmt_us(rtts[0])} "
          f"p90 {fmt_us(rtts[int(0.9 * (len(rtts) - 1))])} over {len(rtts)} pings; configured one-way latency "
          f"{fmt_us(shaping.latency)} ± {fmt_us(shaping.jitter)} (expected RTT: {want_rtt}; "
          f"{facts['MOEFLUX_CLUSTER_SHAPING']})", flush=True)


# ----------------------------------------------------------------------------- teardown


_TEARING_DOWN = False


def teardown() -> None:
    """Stop our processes and delete our namespaces; idempotent, bounded, safe to call from atexit."""
    global _TEARING_DOWN
    if _TEARING_DOWN:
        return
    _TEARING_DOWN = True  # meanwhile, signals are ignored: teardown must finish
    try:
        stop(_PROCS, grace=3)
        _PROCS.clear()
        present = set(list_namespaces()) if _CREATED else set()
        for ns in reversed(_CREATED):  # nodes first, then the switch
            if ns in present:
                remove_namespace(ns)
        _CREATED.clear()
    finally:
        _TEARING_DOWN = False


def _on_signal(signum: int, frame) -> None:
    if not _TEARING_DOWN:
        raise Interrupted(signum)


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cluster.py",
        description="Emulate N nodes on this machine with network namespaces, a bridge and tc-shaped links, "
                    "and start one torchrun per node (c10d rendezvous on node 0), as on a real cluster.",
        epilog="Examples:\n"
               "  python benchmarks/cluster.py --nodes 2 --ranks-per-node 2 --link 1gbit --latency 100us "
               "-- benchmarks/cluster_smoke.py\n"
               "  python benchmarks/cluster.py --link 200mbit --latency 100us --selftest\n"
               "  python benchmarks/cluster.py --cleanup\n\n"
               "Each rank sees GLOO_SOCKET_IFNAME (its node's veth), OMP_NUM_THREADS=1 and MOEFLUX_CLUSTER_NODE, "
               "_NODES, _RANKS_PER_NODE, _LINK, _LATENCY, _JITTER, _LATENCY_EMULATED, _SHAPING.\n"
               f"Exit codes: 0 all nodes succeeded; else the first failing torchrun's; {EXIT_CANNOT_RUN} cannot "
               f"run here (not root, no netns); {EXIT_SHAPING} shaping unavailable; {EXIT_TIMEOUT} --timeout; "
               "130/143 interrupted. Needs root.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="number of emulated nodes (default 2)")
    parser.add_argument("--ranks-per-node", type=int, default=1, help="torchrun --nproc-per-node (default 1)")
    parser.add_argument("--link", type=parse_rate, default=parse_rate("1gbit"), metavar="RATE",
                        help="rate of every node's link, tc units: 1gbit, 200mbit, ...; none (or unshaped): "
                             "no rate limit (default 1gbit)")
    parser.add_argument("--latency", type=parse_duration, default=0.0, metavar="TIME",
                        help="one-way latency between two nodes, e.g. 100us (RTT is twice it); needs netem "
                             "(default 0)")
    parser.add_argument("--jitter", type=parse_duration, default=0.0, metavar="TIME",
                        help="jitter of that latency, e.g. 10us (default 0)")
    parser.add_argument("--strict", action="store_true",
                        help="fail (exit 3) instead of warning when the latency cannot be emulated")
    parser.add_argument("--port", type=int, default=29500, help="rendezvous port on node 0 (default 29500)")
    parser.add_argument("--timeout", type=float, default=900, metavar="SECONDS",
                        help="bound on the whole run; then every node is stopped (exit 124; default 900)")
    parser.add_argument("--grace", type=float, default=5, metavar="SECONDS",
                        help="how long stopped torchruns get between SIGTERM and SIGKILL (default 5)")
    parser.add_argument("--join-timeout", type=int, default=120, metavar="SECONDS",
                        help="torchrun rendezvous join timeout (default 120)")
    parser.add_argument("--selftest", action="store_true",
                        help="measure TCP throughput and RTT between node 0 and node 1 and print them next to "
                             "the configuration (bounded: a few MiB, < 15 s); runs before the command, if any")
    parser.add_argument("--selftest-mb", type=int, default=SELFTEST_BYTES >> 20, metavar="MIB",
                        help=f"size of the selftest transfer (default {SELFTEST_BYTES >> 20})")
    parser.add_argument("--cleanup", action="store_true",
                        help="only remove namespaces (and their processes) left by killed runs, then exit")
    parser.add_argument("--selftest-role", nargs="+", help=argparse.SUPPRESS)  # internal: selftest peers
    # "--" separates our options from the script run by torchrun (and its own options).
    ours, command = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    args.command = command
    if args.selftest_role:
        return args
    if not args.cleanup and not args.selftest and not command:
        parser.error("give a script to run after `--` (or --selftest, or --cleanup)")
    if not 1 <= args.nodes <= 250 or args.ranks_per_node < 1:
        parser.error("--nodes must be in 1..250 and --ranks-per-node >= 1")
    if not 1024 <= args.port <= 65534:
        parser.error("--port must be in 1024..65534")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.selftest_role:  # we are a selftest peer inside a node namespace
        role, addr, port, *rest = args.selftest_role
        if role == "server":
            selftest_server(addr, int(port))
        else:
            selftest_client(addr, int(port), int(rest[0]))
        return 0

    install_iproute2()
    reason = check_can_run()
    if reason:
        log(f"cannot run the emulated cluster: {reason}")
        return EXIT_CANNOT_RUN

    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    atexit.register(teardown)  # the last resort; `finally` below normally does it first
    deadline = time.monotonic() + args.timeout
    try:
        cleanup_stale()
        if args.cleanup:
            live = list_namespaces()
            log(f"cleanup done; {len(live)} namespace(s) of running clusters left alone: {' '.join(live)}"
                if live else "cleanup done; nothing of ours is left")
            return 0
        run_id = str(os.getpid())  # in every name: the next run can tell whether we are still alive
        shaping = Shaping(args.link, args.latency, args.jitter)
        log(f"{args.nodes} node(s) x {args.ranks_per_node} rank(s), asked for {shaping.describe_request()}; "
            f"namespaces {node_ns(run_id, 0)}.. and switch {switch_ns(run_id)}")
        create_topology(run_id, args.nodes)
        facts = apply_shaping(run_id, args.nodes, shaping, args.strict)
        if args.selftest:
            run_selftest(args, run_id, shaping, facts)
        if not args.command:
            return 0
        return run_torchruns(args, run_id, facts, deadline)
    except ClusterError as e:
        log(str(e))
        return e.code
    except Interrupted as e:
        log(f"{e}: stopping and cleaning up")
        return 128 + e.signum
    finally:
        teardown()
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
