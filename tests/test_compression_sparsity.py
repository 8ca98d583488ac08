"""Gradual / block pruning hooks: the cubic schedule, exact per-matrix sparsity, block shapes, group lasso,
zeros that AdamW cannot revive, a bit-exact resume, and the BSR copy that computes what the dense masked model does."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from raynas.compression.encoding import compressible_modules
from raynas.compression.sparsity import (
    BSRLinear,
    Sparsifier,
    SparsifySettings,
    block_norms,
    block_shape,
    block_sparse_copy,
    cubic_sparsity,
    parse_block,
    prune_blocks,
)
from raynas.errors import ConfigError

CPU = torch.device("cpu")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    return BertForSequenceClassification(config)


def inputs(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"input_ids": torch.randint(1, 100, (4, 10), generator=g),
            "labels": torch.randint(0, 2, (4,), generator=g)}


def train(model, hooks: Sparsifier, optimizer, steps: range, check_zeros: bool = False) -> None:
    """The finetune loop's order: loss (+ hooks.loss), backward, AdamW step, hooks.after_step(step + 1)."""
    model.train()
    for step in steps:
        loss = model(**inputs(step)).loss
        extra = hooks.loss(step)
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.after_step(step + 1)
        if check_zeros:
            for name, module in hooks.modules.items():
                assert torch.all(module.weight[~hooks.masks()[name]] == 0), name


def blocks_off(mask: torch.Tensor, block: tuple[int, int]) -> int:
    rows, cols = mask.shape
    return int((~mask.reshape(rows // block[0], block[0], cols // block[1], block[1])[:, 0, :, 0]).sum())


# ---- the schedule ---------------------------------------------------------------------------------
def test_cubic_schedule():
    assert cubic_sparsity(0, 10, 50, 0.1, 0.8) == 0.1
    assert cubic_sparsity(10, 10, 50, 0.1, 0.8) == pytest.approx(0.1)
    assert cubic_sparsity(50, 10, 50, 0.1, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(90, 10, 50, 0.1, 0.8) == 0.8
    assert cubic_sparsity(30, 10, 50, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)  # the cubic, half way
    values = [cubic_sparsity(t, 10, 50, 0.0, 0.8) for t in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    steps = [b - a for a, b in zip(values[10:50], values[11:51])]
    assert all(b <= a + 1e-12 for a, b in zip(steps, steps[1:]))  # fast first, slow near the target
    assert cubic_sparsity(5, 5, 5, 0.0, 0.7) == 0.7  # an empty ramp: the target at once


def test_update_steps_reach_the_final_sparsity_at_end():
    hooks = Sparsifier(SparsifySettings(sparsity=0.5, start_fraction=0.1, end_fraction=0.55, frequency=4))
    hooks.prepare(tiny_bert(), total_steps=100, device=CPU)
    assert (hooks.start_step, hooks.end_step) == (10, 55)
    assert [t for t in range(1, 101) if hooks.updates_at(t)] == [10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 55]


# ---- the masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["1x1", "4x4", [2, 8], "row", "column"])
def test_masks_reach_the_asked_sparsity_per_matrix(block):
    hooks = Sparsifier(SparsifySettings(sparsity=0.75, block=block, frequency=3, end_fraction=0.5, embeddings=True))
    model = tiny_bert()
    hooks.prepare(model, total_steps=12, device=CPU)
    history = []
    for step in range(1, 13):
        hooks.after_step(step)
        history.append(hooks.masks())
    for name, module in hooks.modules.items():
        mask, bs = hooks.masks()[name], block_shape(block, module.weight.shape)
        n = mask.numel() // (bs[0] * bs[1])
        assert abs(blocks_off(mask, bs) - 0.75 * n) <= 1, name
        assert torch.equal(mask, torch.repeat_interleave(torch.repeat_interleave(
            mask[::bs[0], ::bs[1]], bs[0], 0), bs[1], 1)), name  # block-constant
        assert torch.all(module.weight[~mask] == 0)
        for before, after in zip(history, history[1:]):  # monotone: a pruned block stays pruned
            assert not torch.any(after[name] & ~before[name])
    if block == "row":
        rows = hooks.masks()["bert.encoder.layer.0.intermediate.dense"]
        assert torch.all(rows.all(1) | ~rows.any(1)) and rows.all(1).sum() == 16  # 16 of 64 neurons kept
    if block == "column":
        cols = hooks.masks()["bert.encoder.layer.0.output.dense"]
        assert torch.all(cols.all(0) | ~cols.any(0)) and cols.all(0).sum() == 16  # 16 of 64 inputs kept
    assert hooks.status()["sparsity"] == pytest.approx(0.75, abs=0.02)


def test_blocks_are_chosen_by_their_l2_norm():
    w = torch.ones(4, 8)  # 2x4 blocks: L2 2.8 (L1 8) | weak 0.28
    w[:2, 4:] = 0.1
    w[2:, :4] = torch.tensor([3.0, 0, 0, 0])  # one large entry a row: L2 4.2 (L1 6)
    w[2:, 4:] = 1.2  # L2 3.4 (L1 9.6)
    mask = prune_blocks(w, torch.ones_like(w, dtype=torch.bool), (2, 4), 0.5)
    assert torch.equal(mask[::2, ::4], torch.tensor([[False, False], [True, True]]))  # L1 would keep the ones
    plain = prune_blocks(w, torch.ones_like(w, dtype=torch.bool), (1, 1), 0.25)
    assert int((~plain).sum()) == 8 and w[~plain].abs().max() <= w[plain].abs().min()  # 1x1: the 8 smallest |w|


# ---- group lasso ------------------------------------------------------------------------------------
def test_group_lasso_term_and_its_gradient_shrinks_every_block():
    model = tiny_bert()
    hooks = Sparsifier(SparsifySettings(block="4x4", group_lasso=0.1))
    hooks.prepare(model, total_steps=10, device=CPU)
    assert Sparsifier(SparsifySettings()).loss(0) is None  # lambda 0: no term
    before = {n: block_norms(m.weight.detach(), (4, 4)) for n, m in hooks.modules.items()}
    term = hooks.loss(0)
    count = sum(b.numel() for b in before.values())
    assert term is not None and float(term.detach()) > 0
    assert float(term.detach()) == pytest.approx(0.1 * sum(float(b.sum()) for b in before.values()) / count, rel=1e-5)
    model.zero_grad()
    term.backward()
    with torch.no_grad():
        for module in hooks.modules.values():
            module.weight -= 0.01 * module.weight.grad / module.weight.grad.abs().max()
    for name, module in hooks.modules.items():
        after = block_norms(module.weight.detach(), (4, 4))
        assert torch.all(after < before[name]), name


# ---- training with the hooks ------------------------------------------------------------------------
def test_adamw_never_revives_pruned_weights():
    model = tiny_bert()
    hooks = Sparsifier(SparsifySettings(sparsity=0.8, block="4x4", frequency=2, end_fraction=0.5, group_lasso=0.01))
    model = hooks.prepare(model, total_steps=12, device=CPU)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    train(model, hooks, optimizer, range(12), check_zeros=True)
    assert hooks.status()["sparsity"] == pytest.approx(0.8, abs=0.01)
    for name, mask in hooks.masks().items():
        assert float((~mask).float().mean()) == pytest.approx(0.8, abs=16 / mask.numel()), name
    encoded = hooks.encoded(model)
    assert set(encoded) == set(compressible_modules(model, embeddings=False))
    for name, enc in encoded.items():
        assert enc.scheme == "float" and enc.bits == 32 and torch.equal(enc.mask, hooks.masks()[name])
        assert torch.equal(enc.dequantize(), hooks.modules[name].weight.detach())
        assert enc.kept() == int(hooks.masks()[name].sum())


def test_state_dict_round_trip_resumes_identically():
    settings = SparsifySettings(sparsity=0.6, block="2x2", frequency=2, start_fraction=0.1, end_fraction=0.8)

    def fresh():
        model = tiny_bert()
        hooks = Sparsifier(settings)
        model = hooks.prepare(model, total_steps=10, device=CPU)
        return model, hooks, torch.optim.AdamW(model.parameters(), lr=1e-2)

    torch.manual_seed(1)
    model, hooks, optimizer = fresh()
    train(model, hooks, optimizer, range(10))
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)
    model, hooks, optimizer = fresh()
    train(model, hooks, optimizer, range(5))
    buffer = io.BytesIO()  # what a checkpoint holds, through torch.save as the loop writes it
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "hooks": hooks.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    torch.manual_seed(123)  # a different process would start elsewhere
    model, hooks, optimizer = fresh()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    hooks.load_state_dict(state["hooks"])
    torch.set_rng_state(state["rng"])
    assert hooks.step == 5
    train(model, hooks, optimizer, range(5, 10))
    for key, value in model.state_dict().items():
        assert torch.equal(value, straight[key]), key


# ---- bad settings -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field"), [
    ({"sparsity": 1.0}, "sparsify.sparsity"), ({"sparsity": -0.1}, "sparsify.sparsity"),
    ({"initial_sparsity": 0.9}, "sparsify.initial_sparsity"), ({"block": "4by4"}, "sparsify.block"),
    ({"block": [0, 4]}, "sparsify.block"), ({"block": [4]}, "sparsify.block"),
    ({"frequency": 0}, "sparsify.frequency"), ({"start_fraction": 0.5, "end_fraction": 0.2}, "sparsify.end_fraction"),
    ({"group_lasso": -1.0}, "sparsify.group_lasso"),
])
def test_bad_settings_raise_config_error(overrides, field):
    with pytest.raises(ConfigError, match=field):
        Sparsifier(SparsifySettings(**overrides))


def test_a_block_that_does_not_tile_a_weight_names_it():
    assert parse_block("16x16") == (16, 16) and parse_block([2, 3]) == (2, 3) and parse_block("row") == "row"
    Sparsifier(SparsifySettings(block="16x16")).prepare(tiny_bert(), 10, CPU)  # every Linear is 32 / 64 wide
    with pytest.raises(ConfigError, match=r"sparsify\.block: .*word_embeddings\.weight of shape 100x32"):
        Sparsifier(SparsifySettings(block="16x16", embeddings=True)).prepare(tiny_bert(), 10, CPU)


# ---- the BSR copy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["1x1", "4x4", [16, 16]])
def test_block_sparse_copy_computes_the_dense_masked_outputs(block):
    model = tiny_bert()
    embeddings = block != [16, 16]  # 16 does not divide the 100-token vocabulary
    hooks = Sparsifier(SparsifySettings(sparsity=0.8, block=block, frequency=1, end_fraction=0.5,
                                        embeddings=embeddings))
    hooks.prepare(model, total_steps=2, device=CPU)
    hooks.after_step(1)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse BSR tensor support is in beta"
        sparse = block_sparse_copy(model, hooks.masks(), block)
        linears = [m for m in sparse.modules() if isinstance(m, BSRLinear)]
        assert len(linears) == len([m for m in hooks.modules.values() if isinstance(m, torch.nn.Linear)])
        assert all(m.weight.layout == torch.sparse_bsr for m in linears)
        ids = inputs(0)["input_ids"]
        with torch.no_grad():
            dense, out = model(input_ids=ids).logits, sparse(input_ids=ids).logits
    assert torch.allclose(out, dense, rtol=0, atol=1e-5)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, torch.nn.Linear)  # the original is untouched


def test_block_sparse_copy_refuses_blocks_without_a_cpu_kernel():
    model = tiny_bert()
    hooks = Sparsifier(SparsifySettings(block="row"))
    hooks.prepare(model, total_steps=2, device=CPU)
    with pytest.raises(ConfigError, match="non-square"):
        block_sparse_copy(model, hooks.masks(), "row")
