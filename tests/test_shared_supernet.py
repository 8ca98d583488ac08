"""One supernet, many evaluators: ``forward(arch=)``, in-memory state, proxy fitness, the Ray object store."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import batch, tiny_supernet

from raynas.errors import ConfigError
from raynas.supernet import Supernet
from raynas.training.objectives import SupernetObjective, TeacherCache
from raynas.training.validation import validation_losses

KINDS = ("mlm", "kd", "layerwise")


def _batches(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids, mask = batch(seed + i, size=4, seq=12)
        g = torch.Generator().manual_seed(100 + seed + i)
        picked = (torch.rand(ids.shape, generator=g) < 0.3) & mask.bool()
        picked[0, 1] = True  # at least one labelled token per batch
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(picked, ids, -100)})
    return out


def _archs(net: Supernet, n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [net.space.largest(), net.space.smallest(), *(net.space.sample(rng) for _ in range(n - 2))]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_arch_equals_set_active_and_leaves_the_active_arch(kind):
    net = tiny_supernet(kind).eval()
    ids, mask = batch(1)
    before = net.active_arch
    for arch in _archs(net, 5):
        with torch.no_grad():
            given = net(ids, mask, arch=arch, output_hidden_states=True)
        assert net.active_arch == before
        net.set_active(arch)
        with torch.no_grad():
            active = net(ids, mask, output_hidden_states=True)
        net.set_active(before)
        assert torch.equal(given.logits, active.logits)
        assert all(torch.equal(a, b) for a, b in zip(given.hidden_states, active.hidden_states, strict=True))
        with torch.no_grad():
            bare = net(ids, mask, arch=arch, return_logits=False)
        assert bare.logits is None and torch.equal(bare.last_hidden_state, active.last_hidden_state)


def test_forward_rejects_an_arch_outside_the_space_and_labels_without_logits():
    net = tiny_supernet("mlm").eval()
    ids, mask = batch(1)
    with pytest.raises(ConfigError):
        net(ids, mask, arch="9-64-128-4-64")
    with pytest.raises(ValueError, match="return_logits"):
        net(ids, mask, labels=ids, return_logits=False)


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trip_rebuilds_the_same_supernet_without_files(kind):
    net = tiny_supernet(kind).eval()
    arch = _archs(net, 3, seed=5)[2]
    net.set_active(arch)
    state = net.to_state()
    assert all(t.device.type == "cpu" for t in state.tensors.values())
    rebuilt = Supernet.from_state(state)
    assert not rebuilt.training and rebuilt.active_arch == net.active_arch
    theirs = rebuilt.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in net.state_dict().items())
    ids, mask = batch(2)
    with torch.no_grad():
        assert torch.equal(rebuilt(ids, mask).logits, net(ids, mask).logits)


def test_concurrent_threads_on_one_instance_match_sequential_evaluation():
    net = tiny_supernet("layerwise").eval()
    archs, batches = _archs(net, 16, seed=3), _batches()
    sequential = validation_losses(net, archs, batches)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda a: validation_losses(net, [a], batches)[0], archs))
    assert parallel == sequential  # bit-identical: no caller sees another's arch
    assert len({round(r["loss"], 6) for r in sequential}) > 1


@pytest.mark.parametrize("kind", KINDS)
def test_mlm_proxy_fitness_equals_each_extracted_model_evaluated_alone(kind):
    net = tiny_supernet(kind).eval()
    archs, batches = _archs(net, 8, seed=7), _batches()
    shared = validation_losses(net, archs, batches)
    objective = SupernetObjective("mlm")
    for arch, got in zip(archs, shared, strict=True):
        model = net.extract(arch).eval()
        alone = validation_losses(model, [None], batches, objective)[0]
        assert got.keys() == alone.keys() == {"mlm", "loss"}
        assert abs(got["loss"] - alone["loss"]) < 1e-5, (arch, got, alone)


def test_kd_proxy_fitness_runs_the_teacher_once_per_batch():
    torch.manual_seed(0)
    net = tiny_supernet("kd").eval()
    teacher = tiny_supernet("kd", seed=1).extract()  # any masked LM of the same vocabulary
    cache = TeacherCache(teacher)
    objective = SupernetObjective("kd", student_width=net.space.max_hidden, teacher_width=teacher.config.hidden_size,
                                  teacher=cache).eval()
    archs, batches = _archs(net, 6), _batches(4)
    shared = validation_losses(net, archs, batches, objective)
    assert cache.calls == len(batches)
    for arch, got in zip(archs, shared, strict=True):
        alone = validation_losses(net.extract(arch).eval(), [None], batches, objective)[0]
        assert abs(got["hidden"] - alone["hidden"]) < 1e-5


def test_validation_losses_refuses_train_mode_and_archs_on_a_plain_model():
    net = tiny_supernet("mlm")
    with pytest.raises(ValueError, match="eval mode"):
        validation_losses(net, [None], _batches(1))
    with pytest.raises(ValueError, match="plain model"):
        validation_losses(net.extract().eval(), [net.space.largest()], _batches(1))


@pytest.mark.ray
def test_ray_tasks_share_one_put_supernet():
    ray = pytest.importorskip("ray")
    from raynas.orchestration.shared_supernet import put_supernet

    net = tiny_supernet("mlm").eval()
    archs, batches = [net.space.format(a) for a in _archs(net, 6, seed=9)], _batches()
    expected = [r["loss"] for r in validation_losses(net, archs, batches)]
    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        ref = put_supernet(net)  # once; no folder exists anywhere

        @ray.remote(num_cpus=1)
        class Evaluator:
            def losses(self, refs: list, some: list[str]) -> tuple[list[float], int]:
                from raynas.orchestration.shared_supernet import cached_supernets, shared_supernet
                from raynas.training.validation import validation_losses

                shared = shared_supernet(refs[0])
                return [r["loss"] for r in validation_losses(shared, some, batches)], cached_supernets()

        actor = Evaluator.remote()
        first, n1 = ray.get(actor.losses.remote([ref], archs[:3]))
        second, n2 = ray.get(actor.losses.remote([ref], archs[3:]))
    finally:
        ray.shutdown()
    assert (n1, n2) == (1, 1)  # built once, reused by the second call
    assert first + second == pytest.approx(expected, abs=1e-6)
