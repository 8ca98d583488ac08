"""Tiny spaces, supernets and a tokenizer built in memory: every test runs in seconds."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer
from transformers.utils import logging as hf_logging

from raynas.spaces import load_space
from raynas.supernet import Supernet

hf_logging.set_verbosity_error()  # load reports for MLM-vs-base heads are expected here

VOCAB = 100
EMB = {"vocab_size": VOCAB, "max_position_embeddings": 64, "type_vocab_size": 2}
TINY = {
    "mlm": ("autotinybert-mlm", {
        "layers": {"min": 1, "max": 3}, "hidden": {"min": 32, "max": 64, "step": 4},
        "ffn": {"min": 16, "max": 128, "step": 4}, "heads": {"min": 1, "max": 4}, "head_dim": 16, "embeddings": EMB,
    }),
    "kd": ("autotinybert-kd", {
        "layers": {"min": 1, "max": 3}, "hidden": {"min": 32, "max": 64, "step": 4},
        "ffn": {"min": 16, "max": 128, "step": 4}, "heads": {"values": [4]}, "qkv": {"min": 16, "max": 64, "step": 4},
        "head_dim": 16, "embeddings": EMB,
    }),
    "layerwise": ("nas-bert", {
        "num_layers": 6, "hidden": {"values": [48]}, "head_dim": 16, "embeddings": EMB,
        "ops": {"mha": [16, 32, 48], "ffn": [32, 64], "conv": {"kernels": [3, 5], "inner": [16, 32]}, "identity": True},
    }),
}


def tiny_space(kind: str):
    name, overrides = TINY[kind]
    return load_space(name, overrides)


def tiny_supernet(kind: str, seed: int = 0, dropout: float = 0.1) -> Supernet:
    torch.manual_seed(seed)
    return Supernet.from_space(tiny_space(kind), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def batch(seed: int = 0, size: int = 3, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with a padded row, so masking is exercised too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (size, seq), generator=g)
    mask = torch.ones(size, seq, dtype=torch.long)
    mask[1, seq - 4:] = 0
    ids[1, seq - 4:] = 0
    return ids, mask


def training_corpus(tmp: Path) -> Path:
    """Repetitive word patterns over the tiny vocabulary: a tiny model learns them in a few steps."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(VOCAB - 5)]
    paras = []
    for _ in range(200):
        start = rng.randrange(len(words) - 20)
        paras.append(" ".join(words[start: start + 20] * 3))
    path = tmp / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


@contextmanager
def size_limited_tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """``folder`` (created) on a tmpfs of ``size`` bytes for the block: a real full disk. Skips without root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a size-limited tmpfs")
    folder.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance (2 CPUs, no dashboard) for one test module; use with ``pytest.mark.usefixtures``."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests run where CUDA exists and are skipped (with the reason shown) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch.cuda.is_available() is false on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)
