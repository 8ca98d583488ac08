"""The cluster definitions in clusters/ against Ray's own cluster-config schema; no cluster, no network.

The cluster-launcher YAML goes through what ``ray up`` does before it talks to AWS
(``prepare_config`` then ``validate_config`` against ``ray/autoscaler/ray-schema.json``). The KubeRay
manifests go through the converter Ray's autoscaler runs on a RayCluster CR
(``_derive_autoscaling_config_from_ray_cr``, which ends in the same ``validate_config``). Every
``raynas <recipe> --config <path> [key=value ...]`` written in clusters/ must name a real recipe and
a config that loads.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from raynas.cli import RECIPES
from raynas.config_loading import load_config
from raynas.orchestration import supernet_training

# the training config dataclass (TrainConfig; SupernetTrainConfig before raynas train shared it)
TrainConfig = getattr(supernet_training, "TrainConfig", None) or supernet_training.SupernetTrainConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER = CLUSTERS / "ray-cluster-gpu.yaml"
RAYCLUSTER = CLUSTERS / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTERS / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTERS / "kuberay" / "Dockerfile"
IMAGE_CHECKOUT = "/home/ray/raynas/"  # where clusters/kuberay/Dockerfile copies the repository
SHARED = "/mnt/shared/"  # the shared volume every node / pod mounts
PAPER = "recipes/configs/supernet-paper.yaml"
CONFIG_CLASSES = {"supernet": TrainConfig, "train": TrainConfig}  # recipes whose --config the test loads

COMMAND = re.compile(r"raynas\s+([\w-]+)\s+--config\s+([^\s'\"`]+)((?:[ \t]+[\w.]+=[^\s'\"`]+)*)")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _as_ray_cr(name: str, spec: dict) -> dict:
    """A RayCluster CR dict as the autoscaler fetches it from the API server (namespace filled in)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "default"},
            "spec": copy.deepcopy(spec)}


def _raycluster_cr() -> dict:
    cr = copy.deepcopy(_one(RAYCLUSTER, "RayCluster"))
    cr["metadata"].setdefault("namespace", "default")
    return cr


def _rayjob_cr() -> dict:
    job = _one(RAYJOB, "RayJob")
    return _as_ray_cr(job["metadata"]["name"], job["spec"]["rayClusterSpec"])


def _paper() -> TrainConfig:
    return load_config(TrainConfig, REPO / PAPER, [])


def _assert_paper_fits(node_types: dict, head: str, where: str) -> None:
    """The GPU worker types can host supernet-paper.yaml's workers (gpus_per_worker + cpus_per_worker each)."""
    cfg = _paper()
    assert cfg.use_gpu
    gpus = getattr(cfg, "gpus_per_worker", 1)
    slots = 0
    for name, nt in node_types.items():
        res = nt["resources"]
        if name == head or res.get("GPU", 0) < 1:
            continue
        per_node = min(res["GPU"] // gpus, res.get("CPU", 0) // cfg.cpus_per_worker)
        slots += per_node * nt["max_workers"]
    assert slots >= cfg.num_workers, f"{where}: room for {slots} GPU workers, {PAPER} wants {cfg.num_workers}"


# ---------------------------------------------------------------- cluster launcher (ray up)


def test_launcher_yaml_passes_ray_schema():
    raw = _launcher()
    config = prepare_config(copy.deepcopy(raw))  # defaults merged exactly as `ray up` does
    validate_config(config)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and types[head]["resources"].get("GPU", 0) == 0
    gpu = {name: nt for name, nt in types.items() if nt["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    for nt in gpu.values():
        assert nt["min_workers"] == 0 and nt["max_workers"] >= 1
    assert config["max_workers"] >= max(nt["max_workers"] for nt in gpu.values())
    _assert_paper_fits(types, head, LAUNCHER.name)


def test_launcher_yaml_installs_this_checkout():
    raw = _launcher()
    image = raw["docker"]["image"]
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-(gpu|cu\d+)", image), image
    # `ray up` runs from the repository root: "." is the checkout, synced to the path pip installs
    (remote, local), = raw["file_mounts"].items()
    assert (REPO / local / "pyproject.toml").is_file()
    setup = " && ".join(raw["setup_commands"])
    assert "pip install torch==2.13.0" in setup and f"cd {remote}" in setup and "pip install -e" in setup
    assert f"--volume={SHARED.rstrip('/')}:{SHARED.rstrip('/')}" in raw["docker"]["run_options"]


@pytest.mark.parametrize("breakage", ["unknown top-level key", "node type without node_config",
                                      "fractional GPU resource", "unknown docker key"])
def test_broken_launcher_yaml_fails_ray_schema(breakage):
    raw = _launcher()
    worker = next(name for name in raw["available_node_types"] if name != raw["head_node_type"])
    if breakage == "unknown top-level key":
        raw["max_worker"] = 4
    elif breakage == "node type without node_config":
        del raw["available_node_types"][worker]["node_config"]
    elif breakage == "fractional GPU resource":
        raw["available_node_types"][worker]["resources"]["GPU"] = 0.5
    else:
        raw["docker"]["gpus"] = "all"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(raw))


# ---------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("which", ["raycluster", "rayjob"])
def test_kuberay_spec_converts_and_passes_ray_schema(which):
    cr = _raycluster_cr() if which == "raycluster" else _rayjob_cr()
    config = _derive_autoscaling_config_from_ray_cr(cr)  # validates against ray-schema.json itself
    validate_config(config)
    types = config["available_node_types"]
    assert set(types) == {"headgroup", "gpu-workers"}
    assert types["headgroup"]["resources"]["CPU"] == 8 and "GPU" not in types["headgroup"]["resources"]
    gpu = types["gpu-workers"]
    assert gpu["resources"]["GPU"] == 1 and gpu["resources"]["CPU"] == 12
    assert gpu["resources"]["memory"] == 48 * 2**30
    expected = (0, 8) if which == "raycluster" else (8, 8)  # autoscaled 0..8 / fixed 8 for the job
    assert (gpu["min_workers"], gpu["max_workers"]) == expected
    assert config["max_workers"] == 8
    _assert_paper_fits(types, config["head_node_type"], which)


def test_broken_kuberay_spec_fails():
    config = _derive_autoscaling_config_from_ray_cr(_raycluster_cr())
    config["available_node_types"]["gpu-workers"]["gpus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
    cr = _raycluster_cr()  # no CPU limit/request on the head container: the converter refuses it
    del cr["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    with pytest.raises(ValueError, match="CPU"):
        _derive_autoscaling_config_from_ray_cr(cr)


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_pods_mount_the_shared_volume(path):
    claims = {d["metadata"]["name"] for d in _docs(path) if d["kind"] == "PersistentVolumeClaim"}
    cr = _raycluster_cr() if path == RAYCLUSTER else _rayjob_cr()
    spec = cr["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    versions = {spec["rayVersion"]}
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes[mounts[SHARED.rstrip("/")]]["persistentVolumeClaim"]["claimName"] in claims
        assert "nvidia.com/gpu" in pod["containers"][0]["resources"]["limits"] or group is spec["headGroupSpec"]
    # one Ray version everywhere: the KubeRay rayVersion, the image the Dockerfile builds on, the launcher's image
    versions.add(re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", DOCKERFILE.read_text()).group(1))
    versions.add(re.search(r"rayproject/ray:(\d+\.\d+\.\d+)", _launcher()["docker"]["image"]).group(1))
    assert len(versions) == 1, versions


# ---------------------------------------------------------------- the raynas commands written in clusters/


def _commands() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for path in sorted(CLUSTERS.rglob("*")):
        if path.is_file() and (path.suffix in {".yaml", ".md"} or path.name == "Dockerfile"):
            for m in COMMAND.finditer(path.read_text()):
                found.append((str(path.relative_to(REPO)), m.group(1), m.group(2), m.group(3).split()))
    return found


def _config_path(text: str) -> Path:
    if text.startswith(IMAGE_CHECKOUT):
        return REPO / text[len(IMAGE_CHECKOUT):]
    assert not Path(text).is_absolute(), f"{text}: absolute, and not in the image's checkout {IMAGE_CHECKOUT}"
    return REPO / text


def test_every_yaml_names_a_command():
    files = {where for where, *_ in _commands()}
    for path in (LAUNCHER, RAYCLUSTER, RAYJOB):
        assert str(path.relative_to(REPO)) in files


def test_raynas_commands_name_real_recipes_and_loadable_configs():
    commands = _commands()
    assert commands
    for where, recipe, config, overrides in commands:
        assert recipe in RECIPES, f"{where}: raynas {recipe}: no such recipe"
        path = _config_path(config)
        assert path.is_file(), f"{where}: {config}: no such file in the repository"
        assert recipe in CONFIG_CLASSES, f"{where}: raynas {recipe}: the test does not know its config class"
        load_config(CONFIG_CLASSES[recipe], path, [])
        cfg = load_config(CONFIG_CLASSES[recipe], path, overrides)
        # on a cluster the run folder must be shared storage: corpus for the workers, checkpoints for resume
        assert cfg.out.startswith(SHARED), f"{where}: {recipe} --config {config}: out={cfg.out} is not under {SHARED}"


def test_rayjob_entrypoint_runs_the_paper_config():
    job = _one(RAYJOB, "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["spec"]["shutdownAfterJobFinishes"] is True
    (recipe, config, overrides), = [m.groups() for m in COMMAND.finditer(job["spec"]["entrypoint"])]
    assert recipe == "supernet" and _config_path(config) == REPO / PAPER
    assert not re.search(r"[;&|`]", job["spec"]["entrypoint"]), "the submitter's shell would split the entrypoint"
    cfg = load_config(TrainConfig, _config_path(config), overrides.split())
    assert cfg.out.startswith(SHARED) and cfg.use_gpu
