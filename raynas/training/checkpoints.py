"""Training checkpoint folders that are complete or absent, checked at resume, and a full disk that stops cleanly.

Every rank of a run writes its part of ``OUT/checkpoints/step-N`` (its DeepSpeed
shard; rank 0 the student, the trainer state and a usable model). Before, they
wrote straight into ``step-N``: a worker killed or a disk filled mid-write left
a ``step-N`` that looked like a checkpoint, and Ray Train's snapshot (which a
restarted worker group and a rerun driver resume from) may already name it.

Now every rank writes into ``.step-N.tmp``; once all have finished, rank 0
fsyncs every file, writes ``manifest.json`` last (each file's size, the sha256
of small files and of both ends of large ones) and renames the folder to
``step-N`` (fsync'd), and only then is it reported to Ray. A crash at any point
leaves either a complete ``step-N`` or a ``.step-N.tmp`` that the next start
removes. Whatever happens to a checkpoint afterwards (a truncated file, a
restore gone wrong) shows at resume as a file whose size or hash differs from
its manifest: :func:`choose_resume` then takes the newest earlier complete one
and says so in one line.

Pure Python + torch (no Ray): the collectives are passed in as a ``gather``
function (``torch.distributed.all_gather_object``, or ``[x]`` for one process).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from raynas.atomic_io import fsync_path, fsync_tree, write_durable
from raynas.errors import ConfigError

MANIFEST, FORMAT = "manifest.json", "raynas-checkpoint/1"
HASH_WHOLE = 16 << 20  # files up to this size are hashed whole (states, configs, tokenizer, a tiny model)
HASH_ENDS = 1 << 20  # larger ones: their first and last MiB (a cut file also has the wrong size)
SNAPSHOT_HEADROOM = 1 << 20  # left free after a checkpoint, so Ray's snapshot rewrite cannot hit a full disk
LOW_SPACE = 64 << 20  # a torch writer failure with less than this free was the disk filling up
FAULT_ENV = "RAYNAS_FAULT_CHECKPOINT_DISK_FULL"  # "N": checkpoint step N fails as on a full disk (fault tests)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
Gather = Callable[[Any], list[Any]]


class CheckpointWriteError(ConfigError):
    """A checkpoint could not be written (full disk, I/O error): the run stops; the previous checkpoint is intact.

    A :class:`ConfigError` so the CLI prints its one line and exits 2 instead of a traceback: retrying
    cannot help until the user frees space.
    """


def step_dir(ckpts: Path, step: int) -> Path:
    return ckpts / f"step-{step:08d}"


def step_of(folder: Path) -> int | None:
    """N of a ``step-N`` folder; None for anything else."""
    head, _, num = folder.name.partition("-")
    return int(num) if head == "step" and num.isdigit() else None


def staging_dir(final: Path) -> Path:
    """Where ``step-N`` is built: hidden, so neither ``step-*`` globs nor a resume ever see it."""
    return final.with_name(f".{final.name}.tmp")


def _trash_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


# ---------------------------------------------------------------- manifest


def _digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= HASH_WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(HASH_ENDS))
            f.seek(size - HASH_ENDS)
            h.update(f.read(HASH_ENDS))
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """``folder/manifest.json``: every file's size and sha256 (whole, or both ends of a large one); written last."""
    files = {}
    for p in _files(folder):
        size = p.stat().st_size
        files[p.relative_to(folder).as_posix()] = {"size": size, "sha256": _digest(p, size)}
    write_durable(folder / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}).encode())


def verify(folder: Path, required: Sequence[str] = ()) -> str | None:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it (for the warning line).

    A folder without a manifest is from a raynas that wrote none: accepted when its ``required`` files are
    there (the state file was written last), as before.
    """
    if not folder.is_dir():
        return "missing"
    path = folder / MANIFEST
    if not path.is_file():
        absent = [name for name in required if not (folder / name).is_file()]
        return f"no {MANIFEST} and no {', '.join(absent)}" if absent else None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} unreadable ({type(exc).__name__})"
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, entry in files.items():
        p = folder / name
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} is {size:,} bytes, its manifest says {entry['size']:,}"
        if _digest(p, size) != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


# ---------------------------------------------------------------- choosing a checkpoint


def step_folders(ckpts: Path) -> list[Path]:
    """``step-N`` folders, newest first."""
    found = [p for p in ckpts.glob("step-*") if p.is_dir() and step_of(p) is not None] if ckpts.is_dir() else []
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def complete_before(ckpts: Path, step: int, required: Sequence[str] = ()) -> tuple[Path | None, list[str]]:
    """The newest complete ``step-M`` with M < ``step``, and the names of the broken ones skipped on the way."""
    skipped = []
    for folder in step_folders(ckpts):
        if (step_of(folder) or 0) < step:
            if verify(folder, required) is None:
                return folder, skipped
            skipped.append(folder.name)
    return None, skipped


def choose_resume(latest: Path | None, required: Sequence[str] = ()) -> tuple[Path | None, str | None]:
    """The checkpoint to resume from, given the one Ray Train names as the latest; and a warning line if that
    one is incomplete or corrupt (then the newest earlier complete one is used, or none: start at step 0)."""
    if latest is None:
        return None, None
    problem = verify(latest, required)
    if problem is None:
        return latest, None
    previous, skipped = complete_before(latest.parent, step_of(latest) or 0, required)
    also = f" (also skipped {', '.join(skipped)})" if skipped else ""
    then = f"resuming from {previous.name}{also}" if previous else f"no earlier complete checkpoint{also}: starting from step 0"
    return previous, f"warning: checkpoint {latest.name} in {latest.parent} is incomplete or corrupt ({problem}); {then}"


def clean_staging(ckpts: Path) -> None:
    """At start (one process): drop the half-built ``.step-N.tmp`` of a crashed run; put back a ``step-N`` that
    a crash left only as ``.step-N.old`` mid-replacement (Ray's snapshot may name it), else drop that too."""
    if not ckpts.is_dir():
        return
    for p in ckpts.glob(".step-*.old"):
        final = p.with_name(p.name[1:-4])
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.rename(final)
    for p in ckpts.glob(".step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def check_space(ckpts: Path, resume: Path) -> None:
    """Before training on: a disk with less room than the checkpoint being resumed from would fill up at the
    next one. Say so now (a retried or rerun run after a full disk stops in seconds, not after training)."""
    need, free = checkpoint_bytes(resume), shutil.disk_usage(ckpts).free
    if free < need + SNAPSHOT_HEADROOM:
        raise CheckpointWriteError(f"disk full: {free / 2**20:,.1f} MiB free in {ckpts}, a checkpoint takes "
                                   f"{need / 2**20:,.1f} MiB ({resume.name}, intact); free space and rerun")


# ---------------------------------------------------------------- writing


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file: a full disk raises ``OSError(ENOSPC)``, not torch's
    ``RuntimeError: unexpected pos`` (which a path argument gives)."""
    with path.open("wb") as f:
        torch.save(obj, f)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish(staging: Path, final: Path, step: int) -> None:
    """fsync, manifest last, rename ``staging`` to ``final``. An existing ``final`` (a corrupt checkpoint the run
    resumed past, or one written but never reported) is swapped out atomically: Ray's snapshot may name it,
    and Ray refuses to start when a named checkpoint folder is missing."""
    fsync_tree(staging)
    write_manifest(staging, step)
    fsync_path(staging)
    if shutil.disk_usage(staging).free < SNAPSHOT_HEADROOM:
        raise OSError(errno.ENOSPC, "No space left on device (none left for Ray's snapshot)", str(staging))
    if final.exists():
        if _exchange(staging, final):
            shutil.rmtree(staging)
        else:
            trash = _trash_dir(final)
            shutil.rmtree(trash, ignore_errors=True)
            final.rename(trash)
            staging.rename(final)
            shutil.rmtree(trash)
    else:
        staging.rename(final)
    fsync_path(final.parent)


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def classify(exc: BaseException, name: str, where: Path, kept: str, free: int) -> CheckpointWriteError | None:
    """The one-line error for a failed write of checkpoint ``name`` in ``where``, or None when ``exc`` is not
    about writing files. ``kept`` says what is left ("previous checkpoint step-M intact").

    torch's path writer (DeepSpeed's shards) turns ENOSPC into ``RuntimeError: unexpected pos``; such an
    error with (almost) no space left (``free``, measured before the half-written files were removed) is
    the disk filling up too.
    """
    errnos = {getattr(e, "errno", None) for e in _chain(exc)}
    texts = " ".join(str(e) for e in _chain(exc))
    torch_writer = isinstance(exc, RuntimeError) and ("inline_container" in texts or "PytorchStreamWriter" in texts)
    if errnos & set(DISK_FULL) or "No space left" in texts or (torch_writer and free < LOW_SPACE):
        return CheckpointWriteError(f"disk full writing checkpoint {name} in {where}; {kept}")
    if isinstance(exc, OSError) or torch_writer:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckpointWriteError(f"cannot write checkpoint {name} in {where} ({reason}); {kept}")
    return None


def _injected_disk_full(staging: Path, step: int) -> None:
    """Fault tests: checkpoint step ``RAYNAS_FAULT_CHECKPOINT_DISK_FULL`` fails mid-file as on a full disk."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec.strip().isdigit() and int(spec) == step:
        (staging / "injected.partial").write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV})", str(staging))


def _attempt(fn: Callable[[], Any], final: Path, staging: Path) -> tuple[Any, str | None]:
    """Run one write phase: (its result, None), or (None, the one-line error) for a write failure."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 -- safetensors' SafetensorError carries ENOSPC too; others re-raised
        free = shutil.disk_usage(final.parent).free if final.parent.is_dir() else 0
        previous, _ = complete_before(final.parent, step_of(final) or 0)
        kept = f"previous checkpoint {previous.name} intact" if previous else "no earlier checkpoint"
        err = classify(exc, final.name, final.parent, kept, free)
        if err is None:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return None, str(err)


def write_step(final: Path, rank: int, gather: Gather, shard: Callable[[Path], Any],
               main: Callable[[Path, list[Any]], None]) -> None:
    """Build ``final`` (``step-N``) complete or not at all; every rank calls this at the same step.

    1. rank 0 clears a stale ``.step-N.tmp`` and creates it; a gather tells every rank it is there.
    2. every rank: ``shard(staging)`` writes its own files (DeepSpeed's shards; collectives inside) and
       returns what rank 0 needs from it. A rank that fails here removes the staging folder and raises at
       once: the others may wait inside DeepSpeed's barriers, and Ray Train stops the worker group.
    3. every rank: ``main(staging, gathered)`` (rank 0 writes the student and state; collective contexts
       such as ZeRO-3's weight gathering stay matched), then rank 0 publishes (fsync, manifest, rename).
    4. a gather of every rank's error: on any, rank 0 removes the staging folder and every rank raises
       the same :class:`CheckpointWriteError` -- before anything is reported to Ray.
    """
    staging, step = staging_dir(final), step_of(final) or 0

    def begin() -> None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)

    error = _attempt(begin, final, staging)[1] if rank == 0 else None
    _raise_any(gather(error), staging, rank)
    local, error = _attempt(lambda: shard(staging), final, staging)
    if error is not None:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(error)
    gathered = gather(local)
    _, error = _attempt(lambda: main(staging, gathered), final, staging)
    if rank == 0 and error is None:
        def finish() -> None:
            _injected_disk_full(staging, step)
            publish(staging, final, step)
        _, error = _attempt(finish, final, staging)
    _raise_any(gather(error), staging, rank)


def _raise_any(errors: list[str | None], staging: Path, rank: int) -> None:
    first = next((e for e in errors if e), None)
    if first is not None:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(first)
