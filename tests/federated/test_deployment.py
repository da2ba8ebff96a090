"""End to end on Flower's deployment engine over loopback: a real SuperLink, two real SuperNodes and `flwr run`
of examples/flower_app, whose ServerApp/ClientApp are unipeft.federated.app's. The simulation tests cover the
server's checks; this one proves the same app starts, trains and checkpoints when Flower launches it as
separate processes (flwr-serverapp / flwr-clientapp started by each component's SuperExec)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent  # the venv whose flwr-serverapp / flwr-clientapp can import unipeft
TIMEOUT = 240.0


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 (held open together, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Flower's SuperExec runs in its own session, the apps under it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def lowest_priority(pids) -> None:
    """Keep our processes' autogroups at nice 19 (a new session, as SuperExec's, starts a new autogroup)."""
    for pid in pids:
        try:
            if not Path(f"/proc/{pid}/autogroup").read_text().strip().endswith("nice 19"):
                Path(f"/proc/{pid}/autogroup").write_text("19")
        except OSError:
            pass


def start(args: list[str], log: Path, home: Path, cwd: Path) -> subprocess.Popen:
    """Start a Flower command from the test's venv at nice 19, its output in `log`, its FLWR_HOME `home`."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(["nice", "-n", "19", str(BIN / args[0]), *args[1:]], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd)
    lowest_priority([proc.pid])
    return proc


def wait_for(what: str, ready, procs: list[subprocess.Popen], timeout: float) -> None:
    """Poll `ready()` until true; fail if the timeout passes or a long-running component exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"exited while waiting for {what}: {dead}"
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        lowest_priority(pid for p in procs for pid in descendants(p.pid))
        time.sleep(0.5)


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate every started process and the processes Flower started under it; kill what remains."""
    tree = [pid for p in procs for pid in descendants(p.pid)]
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    time.sleep(1.0)  # SuperExec and the apps exit on their own once their parent has gone
    for pid in tree:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def read_history(path: Path):
    try:
        return json.loads(path.read_text())["history"]
    except (OSError, ValueError, KeyError):
        return None  # not written yet (or half written)


def test_flower_app_runs_on_superlink_and_two_supernodes(tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "federated.yaml"
    cfg.write_text(yaml.safe_dump({
        "train": {"model": "mlp", "data": {"source": "digits"}, "threads": 1, "batch_size": 16,
                  "method": {"name": "lora", "r": 4, "target_modules": "all-linear"}, "optimizer": {"lr": 0.01}},
        "clients": 2, "rounds": 2, "min_clients": 2, "local_steps": 5,
        "partition": {"kind": "dirichlet", "alpha": 1.0}, "output_dir": str(out)}))
    link, node0, node1 = free_ports(3)
    cli_home = tmp_path / "home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    logs: list[Path] = []
    procs: list[subprocess.Popen] = []

    def launch(name: str, args: list[str], home: Path) -> subprocess.Popen:
        logs.append(tmp_path / f"{name}.log")
        procs.append(start(args, logs[-1], home, tmp_path))
        return procs[-1]

    started = time.monotonic()
    try:
        launch("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                             "--database", str(tmp_path / "superlink.db"),
                             "--disable-runtime-dependency-installation"], tmp_path / "home-superlink")
        wait_for("the SuperLink", lambda: port_open(link), procs, 60)
        for k, port in enumerate((node0, node1)):
            launch(f"supernode{k}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                     "--node-config", f"partition-id={k} num-partitions=2",
                                     "--host", "127.0.0.1", "--port", str(port)], tmp_path / f"home-node{k}")
        wait_for("the SuperNodes", lambda: port_open(node0) and port_open(node1), procs, 60)
        servers = list(procs)
        run = launch("flwr-run", ["flwr", "run", str(APP), "loopback", "--run-config", f'config="{cfg}"',
                                  "--stream"], cli_home)

        def finished() -> bool:
            ended = run.poll() is not None  # before reading: the history is written before the run ends
            assert read_history(out / "history.json") is not None or not ended, "the run ended without history"
            return read_history(out / "history.json") is not None

        wait_for("history.json", finished, servers, TIMEOUT - (time.monotonic() - started))
        history = read_history(out / "history.json")
        print(f"deployment run: {time.monotonic() - started:.1f} s")
        assert [row["round"] for row in history] == [0, 1, 2]
        assert [row["accepted"] for row in history[1:]] == [[0, 1], [0, 1]]
        assert all(row["rejected"] == [] and row["failures"] == 0 for row in history[1:])
        assert history[2]["valid_accuracy"] > history[0]["valid_accuracy"]
        assert (out / "round-0002" / "adapter" / "adapter_model.safetensors").is_file()
        assert run.wait(timeout=60) == 0  # `flwr run --stream` ends with the run (0 even if the ServerApp fails)
    except BaseException:
        for log in logs:
            print(f"\n===== {log.name} =====\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        stop(procs)
