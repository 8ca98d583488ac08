"""NAS-BERT blocks: the plan, teacher blocks vs transformers' BERT, student blocks vs the supernet, teacher pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from raynas.blockwise.blocks import StudentBlock, TeacherBlocks, gather_blocks, plan_blocks
from raynas.blockwise.pairs import TeacherPairs, write_pairs
from raynas.errors import ConfigError
from raynas.export import from_bert
from raynas.models.modeling_raynas import additive_mask
from raynas.spaces.layerwise import LayerwiseArch, LayerwiseSpace
from raynas.supernet import Supernet

VOCAB, D, L = 100, 32, 4
EMB = {"vocab_size": VOCAB, "max_position_embeddings": 64, "type_vocab_size": 2}


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


def hf_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(bert_config()).eval()


def space(hidden: int = D) -> LayerwiseSpace:
    """8 op-layers (K = 1, 2, 4 all divide it), every op kind."""
    return LayerwiseSpace.from_dict({
        "kind": "layerwise", "name": "tiny-nas-bert", "num_layers": 8, "hidden": {"values": [hidden]}, "head_dim": 8,
        "ops": {"mha": [hidden // 2, hidden], "ffn": [32, 64], "conv": {"kernels": [3], "inner": [hidden // 2, hidden]},
                "identity": True},
        "embeddings": EMB,
    })


def supernet(hidden: int = D, seed: int = 0) -> Supernet:
    torch.manual_seed(seed)
    return Supernet.from_space(space(hidden)).eval()


def batch(seed: int = 0, rows: int = 3, seq: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids with padded rows (different lengths), so the masks matter."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    for r in range(1, rows, 2):
        cut = seq - 2 - r % (seq - 3)
        mask[r, cut:], ids[r, cut:] = 0, 0
    return ids, mask


def paths_for(net: Supernet, num_blocks: int, seed: int) -> list[tuple[str, ...]]:
    """One path per block; together they run every op of the space (8 op-layers, 7 tokens), then random ones."""
    rng, p, tokens = random.Random(seed), len(net.layers) // num_blocks, net.space.tokens
    ops = [*tokens, *(rng.choice(tokens) for _ in range(len(net.layers) - len(tokens)))]
    return [tuple(ops[k * p:(k + 1) * p]) for k in range(num_blocks)]


# ---- the plan ------------------------------------------------------------------------------
def test_plan_ranges_cover_both_sides_in_order():
    plan = plan_blocks(24, 24, 4)
    assert plan.ops_per_block == 6
    assert [plan.teacher_range(k) for k in range(4)] == [range(0, 6), range(6, 12), range(12, 18), range(18, 24)]
    assert plan.student_range(3) == range(18, 24)
    plan = plan_blocks(8, 12, 2)
    assert plan.teacher_range(1) == range(4, 8) and plan.student_range(1) == range(6, 12)
    with pytest.raises(ConfigError, match="block 2"):
        plan.student_range(2)


@pytest.mark.parametrize("teacher,student,k,needle", [
    (24, 24, 5, "K=5 does not divide the teacher's 12 layers"),
    (8, 8, 8, "K=8 does not divide the teacher's 4 layers"),  # 1 op-layer per block would cut a BERT layer
    (24, 20, 3, "supernet's 20 op-layers"),
    (7, 7, 1, "not whole BERT layers"),
    (8, 8, 0, "positive integer"),
])
def test_plan_rejects_uneven_splits_naming_blocks(teacher, student, k, needle):
    with pytest.raises(ConfigError, match="blocks") as err:
        plan_blocks(teacher, student, k)
    assert needle in str(err.value)


# ---- teacher blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_teacher_blocks_chain_to_hf_bert(num_blocks):
    hf = hf_bert()
    ids, mask = batch(rows=4)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    teacher = TeacherBlocks(hf, num_blocks)
    assert (teacher.num_blocks, teacher.hidden_size, teacher.num_op_layers) == (num_blocks, D, 2 * L)
    with torch.no_grad():
        h = teacher.embed(ids)
        for k in range(num_blocks):
            h = teacher.block(k, h, mask)
    torch.testing.assert_close(h, ref.last_hidden_state, atol=1e-5, rtol=0)
    bounds = teacher.boundaries(ids, mask)
    assert len(bounds) == num_blocks + 1
    for k, b in enumerate(bounds):
        torch.testing.assert_close(b, ref.hidden_states[k * L // num_blocks], atol=1e-5, rtol=0)


def test_teacher_blocks_from_mlm_and_raynas_agree_and_stay_in_eval():
    torch.manual_seed(1)
    mlm = BertForMaskedLM(bert_config()).eval()
    ids, mask = batch(1)
    with torch.no_grad():
        ref = mlm.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for teacher in (TeacherBlocks(mlm, 2), TeacherBlocks(from_bert(mlm), 2), TeacherBlocks(from_bert(mlm).raynas, 2)):
        teacher.train()  # dropout 0.1 in the config: must stay off
        assert not teacher.training and not any(m.training for m in teacher.modules())
        assert not any(p.requires_grad for p in teacher.parameters())
        for k, b in enumerate(teacher.boundaries(ids, mask)):
            torch.testing.assert_close(b, ref[2 * k], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="K=3"):
        TeacherBlocks(mlm, 3)


# ---- student blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks", [2, 4])
def test_student_block_computes_what_the_supernet_layers_compute(num_blocks):
    net = supernet()
    plan = plan_blocks(2 * L, len(net.layers), num_blocks)
    paths = paths_for(net, num_blocks, seed=num_blocks)
    ids, mask = batch(2)
    g = torch.Generator().manual_seed(3)
    for k, path in enumerate(paths):
        block = StudentBlock(net, plan, k, hidden=D, teacher_dim=D).eval()
        assert block.in_proj is None and block.out_proj is None
        h = torch.randn(3, 12, D, generator=g)
        ref = h
        for i, token in zip(plan.student_range(k), path):
            ref = net.layers[i](ref, additive_mask(mask, h.dtype), mask, net.space.op_of(token))
        with torch.no_grad():
            torch.testing.assert_close(block(h, mask, path), ref, atol=0, rtol=0)
        expected = {key for key in net.state_dict()
                    if key.startswith("layers.") and int(key.split(".")[1]) in plan.student_range(k)}
        state = block.layer_state()
        assert set(state) == expected
        assert all(torch.equal(v, net.state_dict()[key]) for key, v in state.items())


def test_gathered_blocks_make_the_supernet_compute_the_chained_blocks():
    net, num_blocks = supernet(), 4
    plan = plan_blocks(2 * L, len(net.layers), num_blocks)
    paths = paths_for(net, num_blocks, seed=5)
    blocks = [StudentBlock(net, plan, k, D, D).eval() for k in range(num_blocks)]
    with torch.no_grad():  # "training": every block's copies drift from the supernet, independently
        for block in blocks:
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # copies, not views
    gather_blocks(net, [b.layer_state() for b in blocks])
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("layers.") for k in changed)
    ids, mask = batch(3)
    arch = LayerwiseArch(D, sum(paths, ()))
    with torch.no_grad():
        out = net(ids, mask, arch=arch, output_hidden_states=True, return_logits=False)
        h = out.hidden_states[0]
        for k, (block, path) in enumerate(zip(blocks, paths)):
            h = block(h, mask, path)
            torch.testing.assert_close(h, out.hidden_states[(k + 1) * plan.ops_per_block], atol=0, rtol=0)
    torch.testing.assert_close(h, out.last_hidden_state, atol=0, rtol=0)


def test_gather_blocks_is_strict():
    net = supernet()
    block = StudentBlock(net, plan_blocks(2 * L, len(net.layers), 2), 1, D, D)
    state = block.layer_state()
    before = net.state_dict()["layers.7.ops.ffn.output.weight"].clone()
    bad = dict(state, **{"layers.9.ops.ffn.output.weight": torch.zeros(1)})
    state["layers.7.ops.ffn.output.weight"] += 1.0
    with pytest.raises(ConfigError, match="layers.9"):
        gather_blocks(net, [bad])
    key = "layers.4.ops.mha.query.weight"
    with pytest.raises(ConfigError, match="shape"):
        gather_blocks(net, [{key: torch.zeros(3, 3)}])
    with pytest.raises(ConfigError, match="two block states"):
        gather_blocks(net, [state, state])
    assert torch.equal(net.state_dict()["layers.7.ops.ffn.output.weight"], before)  # nothing written on error


def test_paths_are_validated_and_counted():
    net = supernet()
    block = StudentBlock(net, plan_blocks(2 * L, len(net.layers), 4), 2, D, D)
    h, mask = torch.randn(2, 5, D), torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"\('mha32',\).*2 op tokens"):
        block(h, mask, ("mha32",))
    with pytest.raises(ConfigError, match="mha24"):
        block(h, mask, ("mha24", "id"))
    with pytest.raises(ConfigError, match="2 op tokens"):
        block(h, mask, "id")  # a string is not a path
    assert block.path_params(("id", "id")) == 0
    for path in [("mha16", "ffn64"), ("conv3_32", "mha32"), ("ffn32", "id")]:
        # the weights the path actually runs, counted from the supernet's slices
        actual = sum(v.numel() for layer, spec in zip(net.layers[4:6], block.specs(path))
                     for v in layer.active_params(D, spec).values())
        assert block.path_params(path) == actual > 0


def test_projected_block_runs_in_teacher_dim_and_trains_projections():
    net = supernet(hidden=16)
    plan = plan_blocks(2 * L, len(net.layers), 4)
    torch.manual_seed(0)
    block = StudentBlock(net, plan, 1, hidden=16, teacher_dim=D).train()
    assert (block.in_proj.in_features, block.in_proj.out_features) == (D, 16)
    assert (block.out_proj.in_features, block.out_proj.out_features) == (16, D)
    h, mask = torch.randn(2, 6, D), torch.ones(2, 6, dtype=torch.long)
    out = block(h, mask, ("mha16", "ffn32"))
    assert out.shape == (2, 6, D)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    for proj in (block.in_proj, block.out_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert block.layers[0].ops["mha"].query.weight.grad.abs().sum() > 0
    assert block.layers[0].ops["ffn"].intermediate.weight.grad is None  # op not on the path
    assert not any(k.startswith(("in_proj", "out_proj")) for k in block.layer_state())  # block-local
    with pytest.raises(ConfigError, match="hidden: 32"):
        StudentBlock(net, plan, 0, hidden=32, teacher_dim=D)
    with pytest.raises(ConfigError, match="supernet 8"):
        StudentBlock(net, plan_blocks(8, 4, 2), 0, hidden=16, teacher_dim=D)


# ---- teacher pairs ------------------------------------------------------------------------------
def test_pairs_round_trip_block_boundaries(tmp_path):
    teacher = TeacherBlocks(hf_bert(), 2)
    ids, mask = batch(4, rows=10)
    lines: list[str] = []
    path = write_pairs(teacher, ids, mask, tmp_path / "pairs.arrow", batch_size=4, progress=lines.append)
    assert path == tmp_path / "pairs.arrow" and [p.name for p in tmp_path.iterdir()] == ["pairs.arrow"]
    assert lines and "10/10 rows" in lines[-1]
    pairs = TeacherPairs.open(path)
    assert (pairs.num_rows, pairs.seq_len, pairs.hidden, pairs.num_blocks) == (10, 12, D, 2)
    # expected boundaries computed with the same row batches as the writer: bit-identical floats
    bounds = [torch.cat(parts) for parts in zip(*(teacher.boundaries(ids[i:i + 4], mask[i:i + 4])
                                                  for i in range(0, 10, 4)))]
    for k in range(2):
        inputs, outputs, m = pairs.block(k)
        assert inputs.shape == outputs.shape == (10, 12, D) and inputs.dtype == np.float32 and m.dtype == np.int8
        assert np.array_equal(inputs, bounds[k].numpy()) and np.array_equal(outputs, bounds[k + 1].numpy())
        assert np.array_equal(m, mask.numpy())
        idx = [9, 0, 5, 4]
        sub = pairs.rows(k, idx)
        for got, full in zip(sub, (inputs, outputs, m)):
            assert np.array_equal(got, full[idx])
    with pytest.raises(ConfigError, match="block 2"):
        pairs.block(2)


def test_single_batch_pairs_are_views_of_the_mapped_file(tmp_path):
    teacher = TeacherBlocks(hf_bert(), 1)
    ids, mask = batch(5, rows=3)
    pairs = TeacherPairs.open(write_pairs(teacher, ids, mask, tmp_path / "p.arrow"))
    inputs, outputs, _ = pairs.block(0)
    assert not inputs.flags.writeable and not inputs.flags.owndata  # no copy in RAM
    assert np.array_equal(outputs, teacher.boundaries(ids, mask)[1].numpy())


def test_bad_pairs_files_name_the_file(tmp_path):
    teacher = TeacherBlocks(hf_bert(), 2)
    ids, mask = batch(6, rows=4)
    good = write_pairs(teacher, ids, mask, tmp_path / "good.arrow", batch_size=2)
    truncated = tmp_path / "truncated.arrow"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.arrow"
    garbage.write_bytes(b"not arrow at all" * 10)
    for bad in (truncated, garbage, tmp_path / "missing.arrow"):
        with pytest.raises(ConfigError, match=bad.name):
            TeacherPairs.open(bad)
    with pytest.raises(ConfigError, match="rows, seq_len"):
        write_pairs(teacher, ids, mask[:, :5], tmp_path / "x.arrow")
    assert not (tmp_path / "x.arrow").exists()
