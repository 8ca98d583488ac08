"""Exactness at paper scale: the shipped spaces (BERT-base widths, vocab 30522), 50 archs each.

Slow (a few minutes on 2 CPU cores): ``python -m pytest -m slow tests/test_extraction_fullsize.py``.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from raynas.export import export_model
from raynas.spaces import load_space
from raynas.supernet import Supernet


@pytest.mark.slow
@pytest.mark.parametrize("name", ["autotinybert-mlm", "autotinybert-kd", "nas-bert"])
def test_fullsize_active_path_equals_reloaded_export(name, tmp_path):
    torch.manual_seed(0)
    space = load_space(name)
    net = Supernet.from_space(space).eval()
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    real = mask.bool()
    worst, types = 0.0, set()
    for _ in range(50):
        arch = net.sample_active(rng)
        with torch.no_grad():
            ref = net(ids, mask)
        exported = export_model(net.extract(), tmp_path / "m", overwrite=True)
        types.add(exported.model_type)
        mlm = AutoModelForMaskedLM.from_pretrained(exported.path).eval()
        base = AutoModel.from_pretrained(exported.path).eval()
        with torch.no_grad():
            logits = mlm(input_ids=ids, attention_mask=mask).logits
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        worst = max(worst, (logits - ref.logits)[real].abs().max().item(),
                    (hidden - ref.last_hidden_state)[real].abs().max().item())
        assert worst < 1e-5, f"{arch}: {worst}"
        assert sum(p.numel() for p in base.parameters()) == space.params(arch, "base"), arch
        assert sum(p.numel() for p in mlm.parameters()) == space.params(arch, "mlm"), arch
    print(f"{name}: 50 archs, worst abs diff {worst:.2e}, formats {sorted(types)}")
