"""The one place that decides where Ray runs: a local instance or an existing cluster, checked in seconds.

Every driver of raynas calls :func:`connect` instead of ``ray.init``. Why: Ray
2.60's ``ray.init()`` with no address reads the address file that the last
``ray start`` wrote (``/tmp/ray/ray_current_cluster``, under ``$RAY_TMPDIR`` when
set) and, when that cluster died without ``ray stop`` (head killed, OOM), waits
on the dead GCS indefinitely, logging connection warnings every few seconds; a
``RAY_ADDRESS`` naming a dead or mistyped head does the same. So before Ray is
touched, the GCS of the cluster that would be joined is probed (:func:`probe`: a
TCP connect, then one ``GetClusterId`` gRPC call, since proxies accept any port)
within :data:`CONNECT_TIMEOUT_S` (``RAYNAS_CONNECT_TIMEOUT_S`` overrides):

============================  =======================================================
where the address comes from  when its GCS does not answer
============================  =======================================================
``address`` argument / config  one :class:`ConfigError` line (exit 2): check the address
``RAY_ADDRESS=host:port``      or use ``RAY_ADDRESS=local``
``RAY_ADDRESS=auto``           one :class:`ConfigError` line: ``ray stop`` clears the
                               stale address file, or ``RAY_ADDRESS=local``
nothing (a local run)          a stale address file: one line on stderr, and a local
                               Ray is started instead
============================  =======================================================

``RAY_ADDRESS=local`` (or ``address="local"``) always starts a private local Ray
and never reads the address file. ``private=True`` (benchmarks, which size their
own instance) ignores the address file too, but still honours ``RAY_ADDRESS``.
A reachable address is handed to ``ray.init`` as the user gave it (``None`` /
``"auto"`` stay so), so Ray's own rules for joining (token auth for an
auto-detected local cluster) are unchanged.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raynas.errors import ConfigError

CONNECT_TIMEOUT_S = 2.5
TIMEOUT_ENV = "RAYNAS_CONNECT_TIMEOUT_S"
ADDRESS_ENV = "RAY_ADDRESS"
ADDRESS_FILE = "ray_current_cluster"
CLIENT_PORT = 10001  # ray:// without a port: the Ray Client server's default

Say = Callable[[str], None]
_NOTED: set[tuple[str, str]] = set()  # stale address files already reported by this process


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """Where :func:`connect` will run Ray.

    ``mode``: ``local`` (start a private instance) or ``cluster`` (join ``address``).
    ``init_address``: what to pass to ``ray.init``. ``source``: where the address came
    from, for messages (``RAY_ADDRESS``, ``the address file /tmp/ray/ray_current_cluster``, ...).
    """

    mode: str
    address: str | None
    init_address: str | None
    source: str


@dataclass(frozen=True)
class Connection:
    """What :func:`connect` did: ``started`` is False when Ray was already initialized in this process."""

    mode: str
    address: str | None
    started: bool


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)") from None
    if value <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected seconds (a number > 0)")
    return value


def address_file() -> Path:
    """Ray's record of the last ``ray start`` on this machine (what ``ray.init()`` joins without an address).

    Ray 2.60: ``ray._common.utils.get_ray_address_file(None)`` -- ``$RAY_TMPDIR``, else
    ``$TMPDIR`` on Linux, else ``/tmp``, then ``ray/ray_current_cluster``; Ray's own
    function is used when it exists, so a later Ray moving the file is followed.
    """
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except (ImportError, AttributeError):
        pass
    if os.environ.get("RAY_TMPDIR"):
        base = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        base = os.environ["TMPDIR"]
    else:
        base = "/tmp"
    return Path(base) / "ray" / ADDRESS_FILE


def read_address_file() -> str | None:
    """The address in Ray's address file, or None when there is no (readable, non-empty) file."""
    try:
        text = address_file().read_text().strip()
    except OSError:
        return None
    return text or None


def host_port(address: str) -> tuple[str, int]:
    """``host:port`` (also ``[v6]:port`` and ``scheme://host:port``) -> ``(host, port)``; ConfigError otherwise."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not port_text and address.startswith("ray://"):
        port_text = str(CLIENT_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{address!r} is not a Ray address: give the head's host:port (e.g. 10.0.0.5:6379), "
                          "'auto' for the cluster `ray start` last started on this machine, or 'local'")
    return host, int(port_text)


def _hosts(host: str) -> list[str]:
    """``host``, and for a loopback name also this node's IP: Ray 2.60 connects to ``localhost`` / ``127.0.0.1``
    through the node IP (``services.resolve_ip_for_localhost``), where a GCS bound to it answers."""
    if host not in ("localhost", "127.0.0.1", "::1"):
        return [host]
    try:
        from ray._private.services import get_node_ip_address

        return [host, get_node_ip_address()]
    except Exception:  # a Ray without it: the loopback alone
        return [host]


def _tcp(host: str, port: int, timeout: float) -> tuple[str | None, str]:
    """``(the first of host and, for a loopback name, the node IP to accept a TCP connection in time, "")``,
    or ``(None, why not)``.

    Probes run in daemon threads, so a slow name lookup (``getaddrinfo`` has no
    timeout) is bounded too: an answer later than ``timeout`` counts as none.
    """
    answered: list[str] = []
    errors: list[OSError] = []
    done = threading.Event()

    def probe(name: str) -> None:
        try:
            with socket.create_connection((name, port), timeout=timeout):
                answered.append(name)
                done.set()
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=probe, args=(h,), name="raynas-gcs-probe", daemon=True) for h in _hosts(host)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 0.5
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        if done.wait(0.02):  # the first answer wins; a refused port ends its probe at once
            break
    if answered:
        return answered[0], ""
    if any(isinstance(e, ConnectionRefusedError) for e in errors):
        return None, f"connection refused at {host}:{port}"
    if errors and all(isinstance(e, socket.gaierror) for e in errors):
        return None, f"unknown host {host!r}"
    return None, f"no answer from {host}:{port} within {timeout:g} s"


def _grpc_answer(host: str, port: int, timeout: float) -> str | None:
    """None when a Ray GCS answers a ``GetClusterId`` call on ``host:port``, else why not.

    A TCP accept is not enough: a service mesh sidecar or a transparent proxy accepts
    (and speaks HTTP/2 on) every port, dead cluster or not. A GCS answers the call
    (``OK``, or ``UNAUTHENTICATED`` under Ray's token auth: still a GCS); a proxy says
    ``UNIMPLEMENTED``, a dead one ``UNAVAILABLE`` or runs out of time.
    """
    try:
        import grpc
    except ImportError:  # Ray ships grpcio; without it the TCP answer has to do
        return None
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", timeout=timeout)  # an empty GetClusterIdRequest
        return None
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"{host}:{port} accepts connections but no Ray GCS answered within {timeout:.1f} s; a busy head "
                    f"may need a longer {TIMEOUT_ENV}")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED):
            detail = (exc.details() or "").splitlines()[0][:120] if exc.details() else ""
            return f"{host}:{port} answers, but not as a Ray GCS: gRPC {code.name}{': ' + detail if detail else ''}"
        return None
    finally:
        channel.close()


def probe(address: str, timeout: float) -> str | None:
    """None when ``address`` is a live Ray cluster's GCS (checked within about ``timeout`` seconds), else why not.

    ``ray://`` (Ray Client) and ``http(s)://`` (job server) addresses, and GCS
    ports behind TLS (``RAY_USE_TLS``), are checked for a TCP answer only.
    """
    host, port = host_port(address)
    t0 = time.monotonic()
    answered, why = _tcp(host, port, timeout)
    if answered is None:
        return why
    if "://" in address or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return None
    return _grpc_answer(answered, port, max(0.5, timeout - (time.monotonic() - t0)))


def reachable(address: str, timeout: float) -> bool:
    """Whether :func:`probe` finds a live Ray GCS at ``address`` (a malformed address: no)."""
    try:
        return probe(address, timeout) is None
    except ConfigError:
        return False


def resolve(address: str | None = None, *, private: bool = False, timeout: float | None = None,
            say: Say = _stderr) -> Target:
    """Decide local vs cluster and check the cluster answers, starting nothing (see the module docstring).

    ``address`` (a config key) wins over ``RAY_ADDRESS``; with neither, Ray's address
    file decides unless ``private``.
    """
    wait = timeout_s() if timeout is None else timeout
    env = os.environ.get(ADDRESS_ENV) or None
    requested, source = (address, "ray_address") if address else (env, ADDRESS_ENV) if env else (None, "")
    if requested is not None:
        requested = requested.strip()
    if requested == "local":
        return Target("local", None, "local", source)
    if requested is not None and requested != "auto":
        try:
            host_port(requested)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        why = probe(requested, wait)
        if why is not None:
            raise ConfigError(f"the Ray cluster at {requested} (from {source}) does not answer ({why}): check the "
                              f"address and that the cluster is up, or run on this machine only with "
                              f"{ADDRESS_ENV}=local")
        return Target("cluster", requested, requested, source)
    if private and requested is None:
        return Target("local", None, "local", "")
    found, where = read_address_file(), address_file()
    if requested == "auto":
        if found is None:  # Ray looks for a GCS process on this machine, or fails at once
            return Target("cluster", None, "auto", f"{source}=auto")
        try:
            why = probe(found, wait)
        except ConfigError as exc:
            why = str(exc)
        if why is not None:
            raise ConfigError(f"{source}=auto: the last `ray start` cluster on this machine, {found} (from {where}), "
                              f"does not answer ({why}): it died without `ray stop`. Run `ray stop` to clear the "
                              f"stale address file (then `ray start --head` again), or run on this machine only with "
                              f"{ADDRESS_ENV}=local")
        return Target("cluster", found, "auto", f"{source}=auto ({where})")
    if found is None:
        return Target("local", None, "local", "")
    if not reachable(found, wait):
        if (str(where), found) not in _NOTED:  # once per process: check_cluster and connect both resolve
            _NOTED.add((str(where), found))
            say(f"raynas: {where} names a Ray cluster at {found} that does not answer (a `ray start` that died without "
                f"`ray stop`); starting a local Ray instead (`ray stop` clears the stale file)")
        return Target("local", None, "local", f"stale {where}")
    return Target("cluster", found, None, str(where))


def check_cluster(address: str | None = None, *, private: bool = False, say: Say = _stderr) -> Target | None:
    """The check half of :func:`connect`, for a driver to call before its slow work (tokenizing, loading):
    a dead cluster address then costs seconds, not the work. None when Ray already runs in this process."""
    ray = sys.modules.get("ray")  # not imported yet: certainly not initialized (and no import needed)
    if ray is not None and ray.is_initialized():
        return None
    return resolve(address, private=private, say=say)


def connect(address: str | None = None, *, log_to_driver: bool = True, private: bool = False,
            timeout: float | None = None, say: Say = _stderr, **local_kwargs: Any) -> Connection:
    """Start or join Ray as :func:`resolve` decides, unless this process already did; every driver calls this.

    ``local_kwargs`` (``num_cpus``, ``include_dashboard``, ...) apply only when a
    local instance is started: Ray refuses them when joining a cluster.
    """
    import ray

    if ray.is_initialized():
        return Connection("already", None, False)
    target = resolve(address, private=private, timeout=timeout, say=say)
    kwargs = dict(local_kwargs) if target.mode == "local" else {}
    if target.source.startswith("stale"):
        # Ray's own components in the workers (Train v2's placement-group cleaner, the state API) find "their"
        # cluster with address=None, i.e. through the same stale file, and would wait on the dead GCS; the
        # workers inherit this process's environment, and RAY_ADDRESS=local makes them skip the file.
        os.environ[ADDRESS_ENV] = "local"
    try:
        ray.init(address=target.init_address, log_to_driver=log_to_driver, **kwargs)
    except ConnectionError as exc:
        if target.init_address != "auto":
            raise
        raise ConfigError(f"{target.source}: no running Ray cluster on this machine ({exc}). Start one with "
                          f"`ray start --head`, give its host:port, or run locally with {ADDRESS_ENV}=local") from None
    return Connection(target.mode, target.address, True)

