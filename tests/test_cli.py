"""The raynas command: help, extract end to end, and bad input -> one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from conftest import tiny_supernet
from transformers import AutoModel

from raynas.cli import RECIPES, main
from raynas.supernet import save_supernet
from raynas.tables import to_table, write_parquet


@pytest.fixture
def supernet_dir(tmp_path, tokenizer) -> Path:
    return save_supernet(tiny_supernet("mlm"), tmp_path / "supernet", tokenizer)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_recipe(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in RECIPES:
        assert name in out


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert f"raynas {name}" in capsys.readouterr().out


def test_python_m_recipes_works():
    proc = subprocess.run([sys.executable, "-m", "recipes.extract", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--supernet" in proc.stdout


def test_extract_writes_loadable_folders_and_a_table(supernet_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("models")  # relative to the working directory; the table must not be
    code, stdout, _ = run(capsys, "extract", "--supernet", str(supernet_dir), "--arch", "2-32-64-2-32",
                          "--arch", "3-48-64-2-32", "--out", str(out))
    assert code == 0, stdout
    table = pd.read_parquet(out / "extracted.parquet")
    assert list(table["model_type"]) == ["bert", "raynas"]
    for path, params in zip(table["path"], table["params_base"]):
        assert Path(path).is_absolute()  # a table read from another working directory still finds the models
        assert (Path(path) / "model.safetensors").is_file() and (Path(path) / "tokenizer_config.json").is_file()
        assert sum(p.numel() for p in AutoModel.from_pretrained(path).parameters()) == params


def test_extract_reads_archs_from_a_parquet_table(supernet_dir, tmp_path, capsys):
    archs = tmp_path / "search.parquet"
    write_parquet(to_table([{"arch": a} for a in ("1-32-16-2-32", "2-40-32-1-16", "3-64-128-4-64")],
                           pa.schema([("arch", pa.string())])), archs)
    code, _, _ = run(capsys, "extract", "--supernet", str(supernet_dir), "--archs", str(archs), "--limit", "2",
                     "--out", str(tmp_path / "m"))
    assert code == 0
    assert len(pd.read_parquet(tmp_path / "m" / "extracted.parquet")) == 2


@pytest.mark.parametrize("args, needle", [
    (["--arch", "2-33-64-2-32"], "hidden=33"),
    (["--arch", "2-32-64"], "L-d_m-d_f-h-d_qkv"),
    (["--arch", "2-32-64-2-32", "--arch", "9-32-64-2-32"], "layers=9"),
    (["--archs", "missing.parquet"], "missing.parquet"),
    (["--arch", "2-32-64-2-32", "--limit", "0"], "--limit"),
])
def test_extract_bad_input_is_one_line_and_exit_2(supernet_dir, tmp_path, capsys, args, needle):
    out = tmp_path / "models"
    code, _, err = run(capsys, "extract", "--supernet", str(supernet_dir), *args, "--out", str(out))
    assert code == 2
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing half-written


def test_extract_names_a_bad_supernet_folder(tmp_path, supernet_dir, capsys):
    code, _, err = run(capsys, "extract", "--supernet", str(tmp_path / "nope"), "--arch", "1-32-16-2-32",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "not a supernet folder" in err
    (supernet_dir / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "extract", "--supernet", str(supernet_dir), "--arch", "1-32-16-2-32",
                       "--out", str(tmp_path / "m"))
    assert code == 2 and "model.safetensors" in err


def test_extract_names_a_missing_column(supernet_dir, tmp_path, capsys):
    archs = tmp_path / "t.parquet"
    write_parquet(to_table([{"name": "x"}], pa.schema([("name", pa.string())])), archs)
    code, _, err = run(capsys, "extract", "--supernet", str(supernet_dir), "--archs", str(archs), "--out", str(tmp_path))
    assert code == 2 and "no column 'arch'" in err


def test_unknown_command_exits_2(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "unknown command" in err


def test_malformed_space_yaml_from_the_cli(tmp_path, capsys):
    bad = tmp_path / "space.yaml"
    bad.write_text("kind: homogeneous\nlayers: {min: 1, max: 8}\nhidden: {min: 128, max: 767, step: 4}\n")
    code, _, err = run(capsys, "init", "--space", str(bad), "--out", str(tmp_path / "s"))
    assert code == 2 and str(bad) in err and "hidden" in err and "ffn: missing" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


TINY_TRAIN = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "supernet-tiny.yaml")


@pytest.mark.parametrize("argv", [
    ["init", "--space", "autotinybert-mlm", "--out", "{file}/sub"],
    ["extract", "--supernet", "{supernet}", "--arch", "2-32-64-2-32", "--out", "{file}/sub"],
    ["supernet", "--config", "recipes/configs/supernet-tiny.yaml", "out={file}/sub"],
])
def test_an_output_under_a_file_is_one_line_before_any_work(argv, supernet_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo root: the shipped config path
    (tmp_path / "a-file").write_text("x")
    args = [a.format(file=tmp_path / "a-file", supernet=supernet_dir) for a in argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is inside a file" in err[0], err


@pytest.mark.parametrize("recipe, config", [("supernet", "supernet-tiny.yaml"), ("train", "train-tiny.yaml")])
def test_a_training_recipe_with_no_arguments_names_config(recipe, config, capsys):
    assert main([recipe]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and config in err[0], err


@pytest.mark.parametrize("recipe, args, needle", [
    ("supernet", ["corpus.files=[{tmp}/missing.txt]"], "missing.txt: no such file"),
    ("supernet", ["corpus.files=[{tmp}/corrupt.parquet]"], "corrupt.parquet: cannot read as parquet"),
    ("supernet", ["objective.mode=kd", "objective.teacher={tmp}/no-teacher"], "objective.teacher"),
    ("supernet", ["stepz=3"], "stepz: unknown key"),
    ("supernet", ["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    ("supernet", ["model={tmp}"], "give exactly one of space, init_from and model"),
    ("train", [], "raynas train needs a model folder"),
    ("train", ["model={tmp}/no-model", "space=null"], "model"),
])
def test_training_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, recipe, args, needle):
    """Checked in the driver before Ray starts: nothing under out/ that a rerun would trip over."""
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    out = tmp_path / "out"
    argv = [recipe, "--config", TINY_TRAIN, f"out={out}", *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------- a fast CLI, registration in any import order


_HEAVY = ("torch", "transformers", "ray", "deepspeed", "datasets", "pandas")


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in RECIPES)])
def test_help_imports_no_heavy_library(argv):
    """--help answers before torch / transformers / Ray load: the reason it takes well under a second."""
    code = (f"import sys; from raynas.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {_HEAVY!r} if m in sys.modules), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stderr.strip().splitlines()[-1] == "[]", run.stderr[-2000:]
    assert "usage:" in run.stdout


_REGISTERED = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING as C\n"
               "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\n"
               "print('raynas' in C, 'raynas' in Q)")


@pytest.mark.parametrize("first", [
    "import raynas; import transformers",  # the README's order: registered when transformers loads
    "import transformers; import raynas",  # registered at once
    "import raynas.compression.hf_quantizer",  # a submodule first: its own import pulls transformers in
])
def test_model_type_and_quant_method_register_in_any_import_order(first):
    run = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", f"{first}\n{_REGISTERED}"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["True", "True"], run.stderr[-2000:]


def test_import_raynas_alone_loads_no_heavy_library():
    code = f"import sys, raynas; print(sorted(m for m in {_HEAVY!r} if m in sys.modules)); print(raynas.RaynasConfig)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and lines[0] == "[]" and "RaynasConfig" in lines[1], run.stderr[-2000:]


# ---------------------------------------------------------------- override typos, dry runs


def test_an_override_typo_is_reported_against_the_command_line(tmp_path, capsys):
    assert main(["supernet", "--config", TINY_TRAIN, f"out={tmp_path}/o", "stesp=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "command line 'stesp=10'" in err[0] and "did you mean 'steps'" in err[0], err
    assert TINY_TRAIN not in err[0]


def test_errors_from_the_file_and_the_command_line_each_name_their_source(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(Path(TINY_TRAIN).read_text() + "\ncolour: red\n")
    assert main(["supernet", "--config", str(config), "steps=abc"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: colour: unknown key" in err and "command line 'steps=abc': steps: expected int" in err


@pytest.mark.parametrize("argv", [
    ["supernet", "--config", TINY_TRAIN],
    ["bench", "supernet", "--space", "autotinybert-mlm"],
    ["nasbert"],
])
def test_a_dry_run_checks_says_ok_and_writes_nothing(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    extra = ["--out", str(out / "t.parquet")] if argv[0] == "bench" else [f"out={out}"]
    assert main([*argv, *extra, "--dry-run"]) == 0
    assert "dry run: all checks passed" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_still_refuses_bad_input(tmp_path, capsys):
    assert main(["supernet", "--config", TINY_TRAIN, f"out={tmp_path}/o", "deepspeed.zero_stage=4", "--dry-run"]) == 2
    assert "deepspeed.zero_stage" in capsys.readouterr().err
