"""Checkpoints that survive faults (issue 14, point 3): complete or absent, a damaged latest skipped at resume for
the previous one (one warning line), a full disk stopping with one line and the previous checkpoint intact.

Most tests drive :func:`raynas.training.checkpoints.write_step` directly (no Ray): a real ENOSPC comes from a
file that is a symlink to ``/dev/full``. Two ``ray`` tests run the trainer itself; the ``slow`` one fills a
real tmpfs mounted on ``OUT/checkpoints`` (root only; skipped elsewhere).
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import size_limited_tmpfs

from raynas.training import checkpoints as ck
from raynas.training.checkpoints import (
    CheckpointWriteError,
    check_space,
    choose_resume,
    clean_staging,
    save_torch,
    step_dir,
    verify,
    write_step,
)

REQUIRED = ("trainer_state.json", "student.pt")


def _write(ckpts: Path, step: int, rank: int = 0, gather: Any = lambda x: [x], main_hook: Any = None,
           shard_hook: Any = None) -> Path:
    """A checkpoint shaped like the trainer's: a shard per rank, rank 0's student and state."""
    final = step_dir(ckpts, step)

    def shard(tmp: Path) -> dict[str, int]:
        (tmp / "deepspeed").mkdir(exist_ok=True)
        if shard_hook is not None:
            shard_hook(tmp)
        torch.save({"rank": rank, "w": torch.full((64,), float(step))}, tmp / "deepspeed" / f"shard-{rank}.pt")
        return {"rank": rank}

    def main(tmp: Path, gathered: list[Any]) -> None:
        if rank == 0:
            if main_hook is not None:
                main_hook(tmp)
            save_torch({"w": torch.full((256,), float(step))}, tmp / "student.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "ranks": gathered}))

    write_step(final, rank, gather, shard, main)
    return final


def _hidden(ckpts: Path) -> list[str]:
    """Staging / trash folders of ours (Ray keeps its own ``.validate_storage_marker`` there)."""
    return sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".step-"))


def test_a_checkpoint_is_published_whole_with_its_manifest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    one, two = _write(ckpts, 1), _write(ckpts, 2)
    assert verify(one, REQUIRED) is None and verify(two, REQUIRED) is None
    manifest = json.loads((two / ck.MANIFEST).read_text())
    assert set(manifest["files"]) == {"deepspeed/shard-0.pt", "student.pt", "trainer_state.json"}
    assert manifest["files"]["student.pt"]["size"] == (two / "student.pt").stat().st_size
    assert _hidden(ckpts) == []  # no staging folder left behind
    assert choose_resume(two, REQUIRED) == (two, None)


def test_a_truncated_latest_is_skipped_for_the_previous_with_one_warning(tmp_path):
    ckpts = tmp_path / "checkpoints"
    one, two = _write(ckpts, 1), _write(ckpts, 2)
    student = two / "student.pt"
    size = student.stat().st_size
    with student.open("r+b") as f:
        f.truncate(size // 2)
    folder, warning = choose_resume(two, REQUIRED)
    assert folder == one
    assert warning == (f"warning: checkpoint step-00000002 in {ckpts} is incomplete or corrupt (student.pt is "
                       f"{size // 2:,} bytes, its manifest says {size:,}); resuming from step-00000001")


def test_a_same_size_corruption_and_a_missing_file_are_caught(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _write(ckpts, 1)
    two, three = _write(ckpts, 2), _write(ckpts, 3)
    state = two / "trainer_state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 2', '"step": 9'))  # same length, other bytes
    (three / "deepspeed" / "shard-0.pt").unlink()
    folder, warning = choose_resume(three, REQUIRED)
    assert folder == step_dir(ckpts, 1)
    assert "deepspeed/shard-0.pt is missing" in warning and "(also skipped step-00000002)" in warning
    assert verify(two, REQUIRED) == "trainer_state.json does not match its sha256 in manifest.json"


def test_no_complete_checkpoint_left_starts_from_scratch(tmp_path):
    two = _write(tmp_path / "checkpoints", 2)
    (two / ck.MANIFEST).write_text("{")
    folder, warning = choose_resume(two, REQUIRED)
    assert folder is None and warning.endswith("no earlier complete checkpoint: starting from step 0")


def test_a_checkpoint_from_before_manifests_is_accepted(tmp_path):
    old = step_dir(tmp_path / "checkpoints", 5)
    old.mkdir(parents=True)
    (old / "student.pt").write_bytes(b"x")
    assert verify(old, REQUIRED) == "no manifest.json and no trainer_state.json"  # its state file came last
    (old / "trainer_state.json").write_text("{}")
    assert verify(old, REQUIRED) is None



def _dev_full() -> str:
    """``/dev/full`` when it is the kernel's always-full character device, else skip: writing to a path that is
    not that device (missing, or a regular file left by something else) as root would create or clobber it."""
    import stat

    try:
        if stat.S_ISCHR(os.stat("/dev/full").st_mode):
            return "/dev/full"
    except OSError:
        pass
    pytest.skip("/dev/full is not the full character device here")

def test_a_real_full_disk_stops_with_one_line_and_leaves_the_previous(tmp_path):
    """student.pt is a symlink to /dev/full: the kernel's own ENOSPC, mid-checkpoint."""
    full = _dev_full()
    ckpts = tmp_path / "checkpoints"
    one = _write(ckpts, 1)
    with pytest.raises(CheckpointWriteError) as err:
        _write(ckpts, 2, main_hook=lambda tmp: (tmp / "student.pt").symlink_to(full))
    assert str(err.value) == f"disk full writing checkpoint step-00000002 in {ckpts}; previous checkpoint step-00000001 intact"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]  # no step-2, no .step-2.tmp
    assert verify(one, REQUIRED) is None


def test_torchs_path_writer_on_a_full_disk_is_named_too(tmp_path, monkeypatch):
    """DeepSpeed saves through torch's path writer, whose ENOSPC is 'RuntimeError: ... unexpected pos'."""
    full = _dev_full()
    ckpts = tmp_path / "checkpoints"
    _write(ckpts, 1)
    try:
        torch.save({"w": torch.zeros(1000)}, full)
    except RuntimeError as exc:
        writer_error = exc

    def fail(tmp: Path) -> None:
        raise writer_error

    real = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(CheckpointWriteError, match=r"^disk full writing checkpoint step-00000002 .*step-00000001 intact$"):
        _write(ckpts, 2, shard_hook=fail)
    monkeypatch.setattr(ck.shutil, "disk_usage", real)  # space left: a write error, not a full disk
    with pytest.raises(CheckpointWriteError, match=r"^cannot write checkpoint step-00000002 in .* \(\[enforce fail"):
        _write(ckpts, 2, shard_hook=fail)
    assert _hidden(ckpts) == []


def test_no_room_left_for_rays_snapshot_counts_as_full(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    _write(ckpts, 1)
    real = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointWriteError, match="^disk full writing checkpoint step-00000002"):
        _write(ckpts, 2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]


def test_a_killed_writer_leaves_no_step_folder_and_the_next_start_cleans_up(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _write(ckpts, 1)

    def killed(tmp: Path) -> None:
        raise SystemExit("killed")  # not a write error: nothing cleans up, as with SIGKILL

    with pytest.raises(SystemExit):
        _write(ckpts, 2, main_hook=killed)
    assert not step_dir(ckpts, 2).exists() and _hidden(ckpts) == [".step-00000002.tmp"]
    clean_staging(ckpts)
    assert _hidden(ckpts) == []


def test_rewriting_a_step_swaps_the_old_folder_out(tmp_path):
    """A resume past a corrupt step-N writes step-N again: Ray's snapshot names it, so it never disappears."""
    ckpts = tmp_path / "checkpoints"
    two = _write(ckpts, 2)
    (two / "student.pt").write_bytes(b"cut")
    _write(ckpts, 2)
    assert verify(two, REQUIRED) is None and _hidden(ckpts) == []
    # a crash mid-replacement on a file system without RENAME_EXCHANGE: only the old one, under its trash name
    two.rename(ckpts / ".step-00000002.old")
    clean_staging(ckpts)
    assert verify(two, REQUIRED) is None and _hidden(ckpts) == []


def test_resuming_needs_room_for_one_more_checkpoint(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    one = _write(ckpts, 1)
    check_space(ckpts, one)
    real = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    with pytest.raises(CheckpointWriteError, match=r"^disk full: 1\.0 MiB free in .*step-00000001, intact\); free"):
        check_space(ckpts, one)


def test_every_rank_stops_with_rank_0s_error(tmp_path):
    """Two ranks (threads, a gather over a barrier): rank 0 hits the full disk, both raise its line."""
    full = _dev_full()
    ckpts = tmp_path / "checkpoints"
    _write(ckpts, 1)
    slots: list[Any] = [None, None]
    barrier = threading.Barrier(2)

    def gather_for(rank: int) -> Any:
        def gather(obj: Any) -> list[Any]:
            barrier.wait()
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return gather

    errors: list[str] = ["", ""]

    def run(rank: int) -> None:
        try:
            _write(ckpts, 2, rank, gather_for(rank), main_hook=lambda tmp: (tmp / "student.pt").symlink_to(full))
        except CheckpointWriteError as exc:
            errors[rank] = str(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors[0] == errors[1] and errors[0].startswith("disk full writing checkpoint step-00000002")
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]


def test_the_driver_gets_the_workers_one_line():
    from raynas.orchestration.train_worker import worker_config_error

    disk = CheckpointWriteError("disk full writing checkpoint step-00000002 in /x; previous checkpoint step-00000001 intact")
    group = SimpleNamespace(worker_failures={1: RuntimeError("collective aborted"), 0: disk})
    assert worker_config_error(group) is disk
    other = SimpleNamespace(worker_failures={0: RuntimeError("boom")})
    assert worker_config_error(other) is other


# ---------------------------------------------------------------- fine-tuning checkpoints (prune / quantize jobs)


def _finetune_parts(seed: int) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _resume(step: int) -> Any:
    from raynas.evaluation.finetune_state import Resume

    return Resume(step=step, in_epoch=step, epoch_state=torch.get_rng_state(), train_time=1.0)


def test_finetune_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    from raynas.evaluation.finetune_state import CHECKPOINT, PREVIOUS, load_state, remove_state, save_state

    path = tmp_path / CHECKPOINT
    model, opt, sched = _finetune_parts(0)
    save_state(path, model, opt, sched, None, _resume(5))
    save_state(path, model, opt, sched, None, _resume(10))
    assert (tmp_path / PREVIOUS).is_file()
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)
    resumed = load_state(path, *_finetune_parts(1), None)
    assert resumed is not None and resumed.step == 5
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"warning: checkpoint {CHECKPOINT} in {tmp_path} is corrupt (")
    assert line.endswith(f"resuming from the previous one ({PREVIOUS}, step 5)")
    assert load_state(path, *_finetune_parts(1), None).step == 5  # the good one is current again
    remove_state(path)
    assert list(tmp_path.iterdir()) == []


def test_a_finished_runs_previous_checkpoint_is_not_resumed(tmp_path):
    """A finished run removed its checkpoint: the previous one left beside it is dropped, never resumed from."""
    from raynas.evaluation.finetune_state import CHECKPOINT, PREVIOUS, load_state, save_state

    path = tmp_path / CHECKPOINT
    model, opt, sched = _finetune_parts(0)
    save_state(path, model, opt, sched, None, _resume(5))
    save_state(path, model, opt, sched, None, _resume(10))
    path.unlink()
    assert load_state(path, *_finetune_parts(1), None) is None
    assert not (tmp_path / PREVIOUS).exists()


def test_finetune_checkpoint_on_a_full_disk(tmp_path, monkeypatch):
    from raynas.evaluation import finetune_state as fs

    path = tmp_path / fs.CHECKPOINT
    model, opt, sched = _finetune_parts(0)
    fs.save_state(path, model, opt, sched, None, _resume(5))

    def full(obj: Any, f: Any) -> None:
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fs.torch, "save", full)
    with pytest.raises(CheckpointWriteError) as err:
        fs.save_state(path, model, opt, sched, None, _resume(10))
    assert str(err.value) == (f"disk full writing checkpoint {fs.CHECKPOINT} (step 10) in {tmp_path}; "
                              "previous checkpoint intact")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fs.CHECKPOINT, fs.PREVIOUS])  # no temp file
    assert fs.load_state(path, *_finetune_parts(1), None).step == 5


# ---------------------------------------------------------------- the trainer on Ray


FAULT_STEP = 8  # the ray tests' workers fail checkpoint step 8 as on a full disk (the truncation test never writes 8)


@pytest.fixture(scope="module")
def ray_with_disk_fault():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {ck.FAULT_ENV: str(FAULT_STEP)}})
    yield
    ray.shutdown()


def _train_config(tmp: Path, tokenizer: Any, out: Path, **kw: Any) -> Any:
    from conftest import TINY, training_corpus

    from raynas.config_loading import load_config
    from raynas.orchestration.supernet_training import TrainConfig

    tokenizer.save_pretrained(tmp / "tok")
    name, space = TINY["mlm"]
    raw = {"out": str(out), "space": name, "space_overrides": space, "tokenizer": str(tmp / "tok"),
           "corpus": {"files": [str(training_corpus(tmp))], "seq_len": 32, "validation_fraction": 0.1},
           "batch_size": 8, "lr": 3e-3, "log_every": 5, "num_workers": 1, "deepspeed": {"enabled": False}}
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in kw.items()], defaults=raw)


def _worker_err_logs() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))


@pytest.mark.slow  # two trainer runs (~75 s); tests/test_faults.py does the same to raynas supernet, also slow
@pytest.mark.ray
def test_training_resumes_past_a_truncated_latest_checkpoint(tmp_path, tokenizer, ray_with_disk_fault):
    from raynas.orchestration.supernet_training import run_training

    out = tmp_path / "run"
    first = run_training(_train_config(tmp_path, tokenizer, out, steps=10, checkpoint_every=5, eval_every=10))
    assert first["step"] == 10
    student = out / "checkpoints" / "step-00000010" / "student.pt"
    with student.open("r+b") as f:
        f.truncate(student.stat().st_size // 2)
    second = run_training(_train_config(tmp_path, tokenizer, out, steps=15, checkpoint_every=5, eval_every=15))
    assert second["step"] == 15 and second["start_step"] == 5  # Ray's latest (10) was cut: the one before
    assert f"warning: checkpoint step-00000010 in {out / 'checkpoints'} is incomplete or corrupt (student.pt is" \
           in _worker_err_logs()
    assert all(verify(d, REQUIRED) is None for d in (out / "checkpoints").glob("step-*"))  # step-10 rewritten
    assert _hidden(out / "checkpoints") == []


@pytest.mark.slow  # a trainer run (~30 s); the unit tests above check the same write path without Ray
@pytest.mark.ray
def test_training_stops_on_a_full_disk_with_the_previous_checkpoint_intact(tmp_path, tokenizer, ray_with_disk_fault):
    from raynas.orchestration.supernet_training import run_training
    from raynas.orchestration.train_worker import worker_config_error

    out = tmp_path / "run"
    with pytest.raises(Exception) as err:  # noqa: B017 -- Ray Train's WorkerGroupError, unwrapped below
        run_training(_train_config(tmp_path, tokenizer, out, steps=12, checkpoint_every=4, eval_every=12))
    error = worker_config_error(err.value)
    ckpts = out / "checkpoints"
    assert isinstance(error, CheckpointWriteError), err.value
    assert str(error) == f"disk full writing checkpoint step-{FAULT_STEP:08d} in {ckpts}; previous checkpoint step-00000004 intact"
    assert sorted(p.name for p in ckpts.glob("*step-*")) == ["step-00000004"]
    assert verify(ckpts / "step-00000004", REQUIRED) is None


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_full_tmpfs_stops_training_cleanly(tmp_path, tokenizer, ray_with_disk_fault):
    """OUT/checkpoints on a tmpfs with room for one checkpoint and 1.5 MiB (the 1 MiB kept for Ray's snapshot
    fits): the second checkpoint (about 2 MiB) fills it for real, wherever its write happens to fail."""
    from raynas.orchestration.supernet_training import run_training
    from raynas.orchestration.train_worker import worker_config_error

    probe = tmp_path / "probe"
    run_training(_train_config(tmp_path, tokenizer, probe, steps=3, checkpoint_every=3, eval_every=3))
    size = ck.checkpoint_bytes(probe / "checkpoints" / "step-00000003")
    assert size > 3 * 2**19, size  # else the second would fit too
    with size_limited_tmpfs(tmp_path / "run" / "checkpoints", size + 3 * 2**19) as ckpts:
        with pytest.raises(Exception) as err:  # noqa: B017 -- unwrapped below
            run_training(_train_config(tmp_path, tokenizer, tmp_path / "run", steps=6, checkpoint_every=3, eval_every=6))
        error = worker_config_error(err.value)
        assert str(error) == f"disk full writing checkpoint step-00000006 in {ckpts}; previous checkpoint step-00000003 intact"
        assert sorted(p.name for p in ckpts.glob("*step-*")) == ["step-00000003"]
        assert verify(ckpts / "step-00000003", REQUIRED) is None
        json.loads((ckpts / "checkpoint_manager_snapshot.json").read_text())  # Ray's snapshot whole: a rerun resumes
