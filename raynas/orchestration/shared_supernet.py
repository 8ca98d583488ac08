"""A trained supernet held once in Ray's object store, rebuilt at most once per worker process.

Search evaluates thousands of archs against one supernet. Reading a folder in
every task would repeat the disk read and the deserialisation per trial; here
the driver ``put``s the supernet's in-memory state once
(:meth:`Supernet.to_state`, weights as numpy arrays, which Ray stores without
copying and hands to readers on the same node from shared memory), and each
worker process builds its :class:`Supernet` from it on first use and keeps it.
Evaluations go through ``forward(..., arch=)``, which writes no shared state,
so one cached instance serves every task and thread of that process.
"""

from __future__ import annotations

import threading

import numpy as np
import ray
import torch

from raynas.supernet import Supernet, SupernetState

_cache: dict[tuple[str, str], Supernet] = {}
_lock = threading.Lock()


def put_supernet(net: Supernet) -> ray.ObjectRef:
    """Put ``net`` in the object store once; pass the ref (inside a list / dict, so Ray does not resolve it)."""
    state = net.to_state()
    arrays = {k: v.numpy() for k, v in state.tensors.items()}
    return ray.put(SupernetState(state.config, arrays, state.active_arch))


def shared_supernet(ref: ray.ObjectRef, device: torch.device | str = "cpu") -> Supernet:
    """The supernet behind ``ref`` on ``device``, in eval mode; built once per (ref, device) in this process.

    The returned instance is shared: evaluate with ``net(..., arch=a)`` (see
    :func:`raynas.training.validation.validation_losses`), never ``set_active``.
    """
    key = (ref.hex(), str(device))
    with _lock:  # two threads of one actor must not both build it
        if key not in _cache:
            stored: SupernetState = ray.get(ref)
            # the store's arrays are read-only shared memory: the module gets its own (writable) copy
            tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in stored.tensors.items()}
            _cache[key] = Supernet.from_state(SupernetState(stored.config, tensors, stored.active_arch), device)
        return _cache[key]


def cached_supernets() -> int:
    """How many supernets this process has built (tests check that tasks reuse one)."""
    return len(_cache)


def clear_cache() -> None:
    """Drop the cached supernets of this process (frees their memory)."""
    with _lock:
        _cache.clear()
