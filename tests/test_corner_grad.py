"""``_Corner``'s hand-written backward against autograd's own slicing, for every sliced weight of the supernet.

The reference is the supernet with every ``_corner`` replaced by a plain slice
``w[:s0, :s1, ...]`` (autograd's SliceBackward). Uninitialised memory is filled
with NaN while these tests run (``torch.utils.deterministic.fill_uninitialized_memory``
under deterministic algorithms), so a block of ``_Corner.backward``'s ``new_empty``
buffer left unwritten shows up as NaN instead of as whatever the allocator held.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY, VOCAB, batch

import raynas.supernet.elastic as elastic
from raynas.spaces import load_space
from raynas.supernet import Supernet
from raynas.supernet.elastic import _Corner

# TINY's spaces, plus the layer-wise one with an elastic hidden size (TINY's has one width, so there
# no weight is cut in two dims and _Corner never runs)
SPACES = {**TINY, "layerwise-hidden": (TINY["layerwise"][0], {**TINY["layerwise"][1], "hidden": {"values": [32, 48]}})}


def _supernet(kind: str) -> Supernet:
    name, overrides = SPACES[kind]
    torch.manual_seed(0)
    return Supernet.from_space(load_space(name, overrides), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(autouse=True)
def nan_for_uninitialized_memory():
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()  # the guard works: empty memory reads as NaN
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _plain_corner(w: torch.Tensor, *sizes: int) -> torch.Tensor:
    return w[tuple(slice(0, s) for s in sizes)]


def _count_corner_backwards(monkeypatch) -> list[int]:
    """Wrap ``_Corner.backward`` (autograd looks it up on the class at backward time) to count its calls."""
    calls = [0]
    original = _Corner.backward

    def counted(ctx, grad):
        calls[0] += 1
        return original(ctx, grad)

    monkeypatch.setattr(_Corner, "backward", staticmethod(counted))
    return calls


def _grads(kind: str, arch, labels_seed: int = 0) -> dict[str, torch.Tensor | None]:
    net = _supernet(kind)
    net.set_active(arch)
    ids, mask = batch(seed=labels_seed)
    labels = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(labels_seed + 1))
    labels[mask == 0] = -100
    out = net(ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    # every output the supernet computes takes part, so the pooler's sliced weights get gradients too
    loss = out.loss + out.pooler_output.square().mean() + sum(h.square().mean() for h in out.hidden_states)
    loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in net.named_parameters()}


def _archs(kind: str) -> list:
    space = _supernet(kind).space
    rng = random.Random(7)
    return [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(3))]


CASES = [(kind, i) for kind in SPACES for i in range(5)]


@pytest.mark.parametrize(("kind", "which"), CASES, ids=[f"{k}-{('largest', 'smallest', 'r1', 'r2', 'r3')[i]}"
                                                       for k, i in CASES])
def test_corner_backward_matches_plain_slicing(kind, which, monkeypatch):
    arch = _archs(kind)[which]
    calls = _count_corner_backwards(monkeypatch)
    got = _grads(kind, arch)
    used = calls[0]
    with monkeypatch.context() as m:
        m.setattr(elastic, "_corner", _plain_corner)
        want = _grads(kind, arch)
    assert calls[0] == used, "the reference ran _Corner: _corner was not replaced"
    net = _supernet(kind)
    net.set_active(arch)
    # a weight is cut in two dims exactly when the hidden size is (the other dim: rows of an op)
    assert (used > 0) == (net.active_hidden < net.space.max_hidden), f"{arch}: {used} _Corner backwards"
    assert got.keys() == want.keys()
    for name, g in got.items():
        w = want[name]
        assert (g is None) == (w is None), f"{arch} {name}: grad {g is None=} vs reference {w is None=}"
        if g is None:
            continue
        assert not torch.isnan(g).any(), f"{arch} {name}: _Corner left part of its gradient unwritten"
        assert torch.equal(g[w == 0], torch.zeros_like(g[w == 0])), \
            f"{arch} {name}: non-zero gradient where plain slicing gives exactly 0"
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{arch} {n}: {m}")
    assert any(g is not None and g.abs().sum() > 0 for g in got.values())


def _case(rng: random.Random, ndim: int, n_sizes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shape = tuple(rng.randint(1, 9) for _ in range(ndim))
    sizes = tuple(rng.randint(0, n) for n in shape[:n_sizes])
    return shape, sizes


@pytest.mark.parametrize("ndim", [2, 3])
def test_corner_apply_matches_autograd_slicing(ndim):
    rng = random.Random(ndim)
    for _ in range(200):
        shape, sizes = _case(rng, ndim, ndim)
        w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ref = w.detach().clone().requires_grad_(True)
        out = _Corner.apply(w, *sizes)
        want = _plain_corner(ref, *sizes)
        assert out.shape == want.shape and torch.equal(out, want)
        assert out.data_ptr() == w.data_ptr() or out.numel() == 0  # the very view, no copy
        upstream = torch.randn(want.shape, dtype=torch.float64)
        out.backward(upstream)
        want.backward(upstream)
        assert w.grad.shape == w.shape
        assert torch.equal(w.grad, ref.grad), f"shape {shape} sizes {sizes}"


def test_corner_apply_gradcheck():
    rng = random.Random(3)
    for ndim in (2, 3):
        for _ in range(5):
            shape, sizes = _case(rng, ndim, ndim)
            w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(lambda t, s=sizes: _Corner.apply(t, *s), (w,))


def test_corner_apply_fewer_sizes_than_dims():
    """``_corner``'s contract: ``sizes`` cut the leading dims, the rest stay whole (as plain slicing)."""
    w = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = w.detach().clone().requires_grad_(True)
    out, want = _Corner.apply(w, 2, 3), _plain_corner(ref, 2, 3)
    assert torch.equal(out, want)
    upstream = torch.randn(want.shape, dtype=torch.float64)
    out.backward(upstream)
    want.backward(upstream)
    assert torch.equal(w.grad, ref.grad)


def test_corner_dispatch():
    """``_corner`` takes ``_Corner`` exactly where 2+ dims are cut under autograd, the plain view otherwise."""
    w = torch.randn(6, 8, requires_grad=True)
    assert type(elastic._corner(w, 3, 4).grad_fn).__name__ == "_CornerBackward"
    assert type(elastic._corner(w, 3, 8).grad_fn).__name__ != "_CornerBackward"
    assert type(elastic._corner(w, 6, 4).grad_fn).__name__ != "_CornerBackward"
    with torch.no_grad():
        assert elastic._corner(w, 3, 4).grad_fn is None
