"""A real fleet on loopback: Flower's stock flower-superlink, flower-supernode and flwr run,
each a separate process (one SuperNode through `edgeprop fleet join`), the clients torch-free;
one client's data have the wrong feature count (left out every round with a one-line error).
One SuperNode is killed mid-round (the round completes without it, and it rejoins); the
SuperLink is killed after round 2 (restarted, the run resumes from round 2's checkpoint); the
final global state evaluates."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import edgeprop  # noqa: E402
from edgeprop import datasets  # noqa: E402
from edgeprop.fleet.partition import partition  # noqa: E402
from edgeprop.storage import load_arrays  # noqa: E402

BIN = Path(sys.executable).parent
NODES = 5
pytestmark = pytest.mark.slow  # processes, three rounds, a heartbeat timeout: a few minutes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid and every process below it (from /proc): its children, and Flower's SuperExec and
    app processes that name it with --parent-pid (they outlive a parent that exits)."""
    children = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parents = {int(fields[1])}
        if b"--parent-pid" in argv and argv.index(b"--parent-pid") + 1 < len(argv):
            parents.add(int(argv[argv.index(b"--parent-pid") + 1]))
        for parent in parents:
            children.setdefault(parent, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def is_flower(pid: int) -> bool:
    try:
        return b"flwr" in Path(f"/proc/{pid}/cmdline").read_bytes() or \
            b"flower" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_9(proc: subprocess.Popen) -> None:
    """kill -9 the process and all it started (Flower's SuperExec and app processes); of a
    process that has exited already, only Flower processes that name it are left to kill."""
    alive = proc.poll() is None
    for pid in descendants(proc.pid):
        if (pid == proc.pid and alive) or (pid != proc.pid and is_flower(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)  # reaps it (a no-op if it had exited)


class Fleet:
    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env, self.procs = tmp, env, []
        self.port = free_port()

    def start(self, name: str, *args) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen([str(BIN / args[0]), *map(str, args[1:])], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=self.tmp, start_new_session=True)
        self.procs.append(proc)
        return proc

    def superlink(self) -> subprocess.Popen:
        # --database: a restarted SuperLink still knows its SuperNodes (in memory, it would
        # answer them 401 and they would stop)
        proc = self.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                          "--port", self.port, "--database", self.tmp / "superlink.db")
        wait(lambda: socket.socket().connect_ex(("127.0.0.1", self.port)) == 0, 60, "the SuperLink to listen")
        return proc

    def supernode(self, i: int, data: str = "shard") -> subprocess.Popen:
        return self.start(f"node{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                          "--port", free_port(), "--node-config", f"data='{self.tmp / f'{data}{i}.npz'}' client={i}")

    def join(self, i: int, bundle: Path) -> subprocess.Popen:
        """A SuperNode started the device's way: `edgeprop fleet join` checks, then execs it."""
        return self.start(f"node{i}", "edgeprop", "fleet", "join", "--client", i, bundle, f"127.0.0.1:{self.port}",
                          self.tmp / f"shard{i}.npz", "--insecure", "--port", free_port())

    def stop(self) -> None:
        for proc in self.procs:  # those that exited may have left Flower's processes behind
            kill_9(proc)


def wait(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.5)


def fleet_round(bundle: Path) -> int:
    try:
        return int(load_arrays(bundle / "checkpoints" / "last.npz")[1]["fleet"]["round"])
    except Exception:  # not written yet, or being replaced this instant
        return 0


def test_superlink_and_supernodes_survive_kill_9(bundle_copy, tmp_path):
    train = datasets.load("digits", "train")
    for i, part in enumerate(partition(train.y, NODES, "shard:2", seed=0)):  # two classes' shards each
        np.savez(tmp_path / f"shard{i}.npz", x=train.x[part], y=train.y[part])
    np.savez(tmp_path / f"narrow{NODES}.npz", x=train.x[:100, :32], y=train.y[:100])  # 32 features, not 64
    app = tmp_path / "app"
    edgeprop("fleet", "app", bundle_copy, "--out", app, "--rounds", "3", "--min-clients", NODES + 1,
             "--local-epochs", "4", "--round-timeout", "120", "--test-data", "digits")
    stub = tmp_path / "blocked" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('torch is blocked: the device side must not import it')\n")
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(home), "PYTHONPATH": str(stub.parent),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    fleet = Fleet(tmp_path, env)
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
                                      f'address = "127.0.0.1:{fleet.port}"\ninsecure = true\n')
    try:
        link = fleet.superlink()
        nodes = [fleet.join(0, bundle_copy)] + [fleet.supernode(i) for i in range(1, NODES)] + \
            [fleet.supernode(NODES, "narrow")]
        run = fleet.start("run1", "flwr", "run", app, "fleet", "--stream")
        wait(lambda: fleet_round(bundle_copy) >= 1, 300, "round 1")
        kill_9(nodes[4])                       # mid-round 2
        nodes[4] = fleet.supernode(4)          # and it comes back
        wait(lambda: fleet_round(bundle_copy) >= 2, 400, "round 2")
        kill_9(link)                           # the server, after round 2
        kill_9(run)
        assert fleet_round(bundle_copy) == 2
        fleet.superlink()
        run = fleet.start("run2", "flwr", "run", app, "fleet", "--stream")
        wait(lambda: fleet_round(bundle_copy) >= 3, 400, "round 3 after the restart")
        run.wait(timeout=120)
    finally:
        fleet.stop()
    _, meta = load_arrays(bundle_copy / "checkpoints" / "last.npz")
    history = meta["fleet"]["history"]
    assert [e["round"] for e in history] == [1, 2, 3]
    assert "joining the fleet" in (tmp_path / "node0.log").read_text()
    assert len(history[0]["clients"]) == NODES  # the client with the wrong data is left out, in one line:
    assert [f["error"] for f in history[0]["failed"]] == [
        f"{tmp_path / f'narrow{NODES}.npz'}:train: samples have 32 features (shape [32]); the model expects 64 "
        f"(input shape [64])"]
    assert len(history[1]["clients"]) >= NODES - 1 and history[1]["failed"]  # the killed node left out
    assert 4 in {c["client"] for c in history[2]["clients"]}  # it rejoined
    assert "resumed from round 2" in (tmp_path / "run2.log").read_text()
    out = edgeprop("eval", bundle_copy, "--data", "digits").stdout
    assert f"{history[-1]['accuracy']:.4f}" in out
    shutil.rmtree(home, ignore_errors=True)
