"""Local vs existing Ray cluster, decided in one place and checked in seconds (issue 14, point 1).

Ray 2.60's ``ray.init`` waits minutes on a dead GCS (a stale ``ray_current_cluster``
or a dead ``RAY_ADDRESS``). These tests point Ray's address file elsewhere with
``RAY_TMPDIR`` (so no other Ray user on the machine is touched), stand in for a GCS
with a tiny gRPC server, and check that :mod:`raynas.orchestration.cluster` stops
with one line or falls back to a local Ray. Only the ``ray`` test starts Ray; the
``slow`` one starts (and kills) a real ``ray start --head`` of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import pytest

from raynas.errors import ConfigError
from raynas.orchestration import cluster
from raynas.orchestration.cluster import connect, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = str(ROOT / "recipes" / "configs" / "supernet-tiny.yaml")
HANG_GUARD_S = 30  # Ray alone waits minutes on a dead GCS; the check takes seconds (not a benchmark)


def ray_running_here() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp(monkeypatch):
    """A private Ray temp dir (short: Ray's socket paths must fit 107 chars) holding the address file."""
    path = Path(tempfile.mkdtemp(prefix="rn14-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "_NOTED", set())
    (path / "ray").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def write_address(ray_tmp: Path, address: str) -> Path:
    path = ray_tmp / "ray" / "ray_current_cluster"
    path.write_text(address)
    assert cluster.address_file() == path  # Ray reads the same file
    return path


def gcs_server(delay_s: float = 0.0):
    """A gRPC server answering ``NodeInfoGcsService/GetClusterId`` as a GCS does (after ``delay_s``)."""
    grpc = pytest.importorskip("grpc")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: time.sleep(delay_s) or b"")
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "ray.rpc.NodeInfoGcsService", {"GetClusterId": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def fake_gcs():
    server, address = gcs_server()
    yield address
    server.stop(0)


@pytest.fixture
def not_a_gcs():
    """A gRPC server with no Ray services: what a proxy or sidecar that accepts every port looks like."""
    grpc = pytest.importorskip("grpc")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def refused(monkeypatch, **env: str) -> tuple[str, float]:
    """connect()'s ConfigError under ``env`` (ray.init must not be reached) and the seconds it took."""
    if ray_running_here():
        pytest.skip("Ray already runs in this test process: connect() would reuse it")
    import ray

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init reached with a dead address"))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as exc:
        connect(log_to_driver=False)
    return str(exc.value), time.perf_counter() - t0


# ---------------------------------------------------------------- a dead cluster: one line in seconds


def test_a_dead_ray_address_is_one_line_naming_the_fix(ray_tmp, monkeypatch):
    port = closed_port()
    line, seconds = refused(monkeypatch, RAY_ADDRESS=f"127.0.0.1:{port}")
    assert f"127.0.0.1:{port} (from RAY_ADDRESS) does not answer (connection refused" in line
    assert "RAY_ADDRESS=local" in line and "\n" not in line and seconds < HANG_GUARD_S


def test_a_stale_address_file_under_auto_names_ray_stop(ray_tmp, monkeypatch):
    path = write_address(ray_tmp, f"127.0.0.1:{closed_port()}")
    line, seconds = refused(monkeypatch, RAY_ADDRESS="auto")
    assert f"(from {path})" in line and "died without `ray stop`" in line and "Run `ray stop`" in line
    assert "RAY_ADDRESS=local" in line and "\n" not in line and seconds < HANG_GUARD_S


def test_a_port_that_answers_but_is_no_gcs_is_dead(ray_tmp, not_a_gcs, monkeypatch):
    line, _ = refused(monkeypatch, RAY_ADDRESS=not_a_gcs)
    assert "answers, but not as a Ray GCS: gRPC UNIMPLEMENTED" in line


def test_a_gcs_too_busy_to_answer_in_time_names_the_timeout_knob(ray_tmp, monkeypatch):
    server, address = gcs_server(delay_s=3)
    try:
        line, _ = refused(monkeypatch, RAY_ADDRESS=address, RAYNAS_CONNECT_TIMEOUT_S="0.5")
    finally:
        server.stop(0)
    assert "no Ray GCS answered within 0.5 s" in line and "RAYNAS_CONNECT_TIMEOUT_S" in line


def test_a_malformed_address_names_where_it_came_from(ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head-node")
    with pytest.raises(ConfigError, match=r"^RAY_ADDRESS: 'head-node' is not a Ray address: give the head's host:port"):
        resolve()


def test_the_supernet_recipe_stops_before_ray_and_writes_nothing(ray_tmp, tmp_path, monkeypatch, capsys):
    """The real command, in process: the check runs after the config checks, before tokenizing and Ray."""
    if ray_running_here():
        pytest.skip("Ray already runs in this test process")
    from raynas.cli import main

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert main(["supernet", "--config", TINY_TRAIN, f"out={out}"]) == 2
    assert time.perf_counter() - t0 < HANG_GUARD_S
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raynas supernet: error: the Ray cluster at 127.0.0.1:")
    assert not out.exists() and not ray_running_here()


# ---------------------------------------------------------------- local vs cluster


def test_a_stale_address_file_without_ray_address_means_a_local_ray_said_once(ray_tmp):
    path = write_address(ray_tmp, f"127.0.0.1:{closed_port()}")
    notes: list[str] = []
    assert resolve(say=notes.append).init_address == "local"
    assert resolve(say=notes.append).mode == "local"  # check_cluster then connect: one note, not two
    assert len(notes) == 1 and str(path) in notes[0] and "starting a local Ray instead" in notes[0]
    assert "`ray stop`" in notes[0]


def test_a_live_address_file_is_joined_the_way_ray_joins_it(ray_tmp, fake_gcs):
    write_address(ray_tmp, fake_gcs)
    target = resolve()
    assert (target.mode, target.address, target.init_address) == ("cluster", fake_gcs, None)


def test_ray_address_names_the_cluster_and_local_skips_the_address_file(ray_tmp, fake_gcs, monkeypatch):
    write_address(ray_tmp, f"127.0.0.1:{closed_port()}")  # stale, but never read below
    notes: list[str] = []
    monkeypatch.setenv("RAY_ADDRESS", fake_gcs)
    assert resolve(say=notes.append).init_address == fake_gcs
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert resolve(say=notes.append).init_address == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve(private=True, say=notes.append).init_address == "local"  # benchmarks: their own instance
    assert resolve("local", say=notes.append).mode == "local"  # an address argument (config key) wins
    assert notes == []


def test_no_address_and_no_file_is_a_local_run(ray_tmp):
    assert resolve() == cluster.Target("local", None, "local", "")


@pytest.mark.ray
def test_a_stale_address_file_still_trains_locally(ray_tmp, capsys):
    """What hung before: no RAY_ADDRESS and a dead `ray start` in the address file -> a local Ray, at once."""
    if ray_running_here():
        pytest.skip("Ray already runs in this test process")
    import ray

    write_address(ray_tmp, f"127.0.0.1:{closed_port()}")
    try:
        got = connect(num_cpus=1, include_dashboard=False, log_to_driver=False)
        assert got.mode == "local" and got.started
        assert ray.get(ray.put(41)) + 1 == 42
        assert connect().mode == "already"
    finally:
        ray.shutdown()
    assert "starting a local Ray instead" in capsys.readouterr().err


# ---------------------------------------------------------------- a real `ray start --head` that dies


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (this test's own Ray temp dir): the ones it started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_ray_start_head_is_detected_in_seconds(ray_tmp, monkeypatch):
    if not Path("/proc").is_dir() or shutil.which("ray") is None:
        pytest.skip("needs /proc and the ray CLI")
    port = closed_port()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(["ray", "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        found = cluster.read_address_file()
        assert found is not None and found.endswith(f":{port}")
        assert resolve().mode == "cluster"  # alive: the probe knows a real GCS (token auth on)
    finally:
        for pid in _pids_using(str(ray_tmp)):  # kill -9 this head only, as an OOM kill would: no `ray stop`
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.time() + 30
    while _pids_using(str(ray_tmp)) and time.time() < deadline:
        time.sleep(0.2)
    assert cluster.read_address_file() == found  # the stale file stays, as after a real crash
    line, seconds = refused(monkeypatch, RAY_ADDRESS="auto")
    assert "died without `ray stop`" in line and seconds < HANG_GUARD_S
    monkeypatch.delenv("RAY_ADDRESS")
    notes: list[str] = []
    assert resolve(say=notes.append).mode == "local" and "starting a local Ray instead" in notes[0]
