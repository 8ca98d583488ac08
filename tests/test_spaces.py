"""Search spaces: shipped defaults, sampling operators, validation messages, counts and bins."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY, tiny_space
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from raynas import RaynasConfig, RaynasModel
from raynas.errors import ConfigError
from raynas.spaces import HomogeneousSpace, LayerwiseSpace, TinyArch, builtin_spaces, load_space

KINDS = list(TINY)


def test_shipped_spaces_hold_the_paper_defaults():
    assert builtin_spaces() == ["autotinybert-kd", "autotinybert-mlm", "nas-bert"]
    mlm, kd, nas = (load_space(n) for n in ("autotinybert-mlm", "autotinybert-kd", "nas-bert"))
    assert isinstance(mlm, HomogeneousSpace) and mlm.strategy == "heads"
    assert mlm.dims["layers"].values == tuple(range(1, 9))
    assert mlm.dims["hidden"].values == tuple(range(128, 769, 4))
    assert mlm.dims["ffn"].values == tuple(range(128, 3073, 4))
    assert mlm.dims["qkv"].values == tuple(64 * h for h in range(1, 13))
    assert kd.strategy == "dims" and kd.dims["heads"].values == (12,)
    assert kd.dims["qkv"].values == tuple(range(180, 769, 12))
    assert str(mlm.largest()) == "8-768-3072-12-768"
    assert isinstance(nas, LayerwiseSpace) and nas.num_layers == 24 and len(nas.tokens) == 26


def test_arch_string_form_roundtrips():
    space = load_space("autotinybert-mlm")
    assert space.parse("5-564-1054-8-512") == TinyArch(5, 564, 1054, 8, 512)
    assert space.format("5-564-1052-8-512") == "5-564-1052-8-512"
    nas = load_space("nas-bert")
    arch = nas.sample(random.Random(0))
    assert nas.parse(str(arch)) == arch == nas.parse(arch.to_json())


@pytest.mark.parametrize("kind", KINDS)
def test_sample_mutate_crossover_stay_in_space(kind, rng):
    space = tiny_space(kind)
    pop = [space.sample(rng) for _ in range(50)]
    for a, b in zip(pop, pop[1:]):
        space.validate(space.mutate(a, rng))
        child = space.crossover(a, b, rng)
        space.validate(child)
    assert space.mutate(pop[0], rng, prob=0.0) == pop[0]
    assert len({str(a) for a in pop}) > 40  # sampling explores


def test_crossover_takes_each_dim_from_a_parent(rng):
    space = tiny_space("mlm")
    for _ in range(50):
        a, b = space.sample(rng), space.sample(rng)
        child = space.crossover(a, b, rng)
        for dim in ("layers", "hidden", "ffn", "heads"):
            assert getattr(child, dim) in (getattr(a, dim), getattr(b, dim))
        assert child.qkv == 16 * child.heads  # strategy 'heads' ties qkv to heads


@pytest.mark.parametrize("kind", KINDS)
def test_encoding_has_fixed_length_in_unit_range(kind, rng):
    space = tiny_space(kind)
    codes = [space.encode(space.sample(rng)) for _ in range(20)]
    assert len({len(c) for c in codes}) == 1
    assert all(0.0 <= v <= 1.0 for c in codes for v in c)


@pytest.mark.parametrize("arch, needle", [
    ("5-564", "L-d_m-d_f-h-d_qkv"),
    ("a-b-c-d-e", "5 positive integers"),
    ("9-512-1024-8-512", "layers=9"),
    ("5-564-1054-8-512", "ffn=1054"),
    ("5-100-1024-8-512", "hidden=100"),
    ("2-128-256-2-192", "qkv=192"),
    ("2-128-256-13-832", "heads=13"),
])
def test_bad_homogeneous_archs_name_the_field(arch, needle):
    with pytest.raises(ValueError, match=needle):
        load_space("autotinybert-mlm").validate(arch)


@pytest.mark.parametrize("arch, needle", [
    ("mha256", "HIDDEN:op"),
    ("512:" + ",".join(["mha256"] * 23), "23 op-layers"),
    ("768:" + ",".join(["mha256"] * 24), "hidden=768"),
    ("512:" + ",".join(["mha256"] * 23 + ["ffn999"]), "op-layer 23 op 'ffn999'"),
    ("512:" + ",".join(["mha256"] * 23 + ["attn"]), "token 'attn'"),
    ('{"hidden": 512}', "JSON"),
])
def test_bad_layerwise_archs_name_the_field(arch, needle):
    with pytest.raises(ConfigError, match=needle):
        load_space("nas-bert").validate(arch)


def test_kd_space_rejects_qkv_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="qkv=190"):
        load_space("autotinybert-kd").validate("2-128-256-12-190")


@pytest.mark.parametrize("text, needles", [
    ("kind: homogeneous\nlayers: [1, 2\n", ["not valid YAML", "line"]),
    ("- just a list\n", ["mapping"]),
    ("kind: pyramid\n", ["kind", "pyramid"]),
    ("kind: homogeneous\nlayers: {min: 1, max: 8}\nhidden: {min: 128, max: 767, step: 4}\nffn: {min: 0, max: 10}\n"
     "heads: {values: []}\ncolour: red\n", ["hidden", "ffn.min", "heads.values", "colour"]),
    ("kind: layerwise\nnum_layers: -3\nhidden: {values: [64]}\nops: {mha: [100], conv: {kernels: [4], inner: [8]}}\n",
     ["num_layers"]),
    ("kind: layerwise\nnum_layers: 4\nhidden: {values: [64]}\nops: {mha: [100], conv: {kernels: [4], inner: [8]}}\n",
     ["head_dim 64", "kernel 4"]),
])
def test_malformed_space_yaml_gives_one_error_naming_every_field(tmp_path, text, needles):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    for needle in needles:
        assert needle in str(info.value)


def test_missing_space_file_is_named():
    with pytest.raises(ConfigError, match="no-such.yaml"):
        load_space("no-such.yaml")


@pytest.mark.parametrize("kind", KINDS)
def test_analytic_flops_match_torch_flop_counter(kind, rng):
    space = tiny_space(kind)
    seq = 16
    for _ in range(5):
        arch = space.sample(rng)
        hidden, ops = space.plan(arch)
        model = RaynasModel(RaynasConfig(vocab_size=100, hidden_size=hidden, max_position_embeddings=64,
                                         layers=[op.to_dict() for op in ops]), add_pooling_layer=False).eval()
        h = torch.randn(1, seq, hidden)
        counter = FlopCounterMode(display=False)
        # the math backend decomposes attention into matmuls the counter sees (CPU flash SDPA is not counted)
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for layer in model.layers:
                h = layer(h, None, None)
        assert counter.get_total_flops() == space.flops(arch, seq), str(arch)


@pytest.mark.parametrize("kind", KINDS)
def test_param_bins_cover_the_space(kind, rng):
    space = tiny_space(kind)
    for method in ("uniform", "quantile"):
        edges = space.bin_edges(4, method=method)
        assert len(edges) == 5 and edges == sorted(edges)
        assert space.bin_of(space.smallest(), edges) == 0
        assert space.bin_of(space.largest(), edges) == 3
        counts = [0] * 4
        for _ in range(400):
            counts[space.bin_of(space.sample(rng), edges)] += 1
        if method == "quantile":
            assert min(counts) > 40, counts  # roughly balanced by construction


def test_bins_reject_bad_requests():
    space = tiny_space("mlm")
    with pytest.raises(ConfigError, match="n_bins"):
        space.bin_edges(0)
    with pytest.raises(ConfigError, match="binning"):
        space.bin_edges(3, method="log")


@pytest.mark.parametrize("name", ["autotinybert-mlm", "autotinybert-kd"])
def test_the_parse_error_suggests_an_arch_the_space_accepts(name):
    space = load_space(name)
    with pytest.raises(ValueError, match="e.g. ") as info:
        space.parse("5-564")
    suggested = str(info.value).split("e.g. ")[1].split(" ")[0]
    assert space.validate(suggested)  # the example in the message is valid in that very space
