"""Atomic writes give their results the modes an ordinary mkdir / open would, not tempfile's private ones."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from raynas.atomic_io import atomic_dir, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_folder_and_its_files_get_umask_modes(tmp_path, umask_022):
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(tmp_path / "model") == 0o755  # tempfile.mkdtemp alone gives 0o700
    assert _mode(tmp_path / "model" / "config.json") == 0o644


def test_a_file_gets_umask_modes(tmp_path, umask_022):
    with atomic_file(tmp_path / "table.parquet") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "table.parquet") == 0o644  # tempfile.mkstemp alone gives 0o600


def test_a_stricter_umask_is_respected(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_file(tmp_path / "private.txt") as tmp:
            tmp.write_text("secret")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private.txt") == 0o600


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_names_the_field_and_creates_nothing(tmp_path):
    from raynas.atomic_io import check_writable
    from raynas.errors import ConfigError

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"^--out: .*a-file/sub is inside a file"):
        check_writable(tmp_path / "a-file" / "sub", "--out")
    with pytest.raises(ConfigError, match=r"^out: .* is a file"):
        check_writable(tmp_path / "a-file", "out")
    assert check_writable(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_files_a_library_writes_privately_get_umask_modes_too(tmp_path, umask_022):
    """safetensors writes 0600 whatever the umask: nobody else on a shared file system could load the model."""
    import torch
    from safetensors.torch import save_file

    with atomic_dir(tmp_path / "model") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
    assert _mode(tmp_path / "model" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "model" / "sub") == 0o755 and _mode(tmp_path / "model" / "sub" / "x.json") == 0o644


def test_a_location_access_allows_but_the_file_system_refuses_is_one_line(tmp_path):
    """As root, access() says yes even where mkdir fails (sysfs); the probe finds out and leaves nothing behind."""
    from raynas.atomic_io import check_writable
    from raynas.errors import ConfigError

    if not Path("/sys").is_dir() or os.access("/sys", os.W_OK) is False:
        pytest.skip("needs a /sys that access() calls writable (root on Linux)")
    with pytest.raises(ConfigError, match=r"--out: cannot create /sys/raynas-x/y: .* in /sys"):
        check_writable("/sys/raynas-x/y", "--out")
    check_writable(tmp_path / "fine", "--out")
    assert list(tmp_path.iterdir()) == []
