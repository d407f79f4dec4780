"""Token shards (`leanlm tokenize`, data.source=tokens:DIR) and other engines' token files."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from leanlm.engine.config import load_config
from leanlm.engine.data import build_corpus
from leanlm.engine.data.tokenize import tokenize_source
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.errors import DataError
from leanlm.engine.trainer import train


@pytest.fixture(scope="module")
def shards(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "s"
    tokenize_source(str(corpus_dir), out, vocab_size=512, val_fraction=0.15, unit_bytes=60_000)
    return out


def _over(tiny_base, source, tmp_path, extra=()):
    keep = [o for o in tiny_base if not o.startswith(("data.source", "data.vocab_size"))]
    return [*keep, f"data.source={source}", f"train.out_dir={tmp_path / 'run'}", *extra]


def test_shards_hold_every_document_framed_and_the_same_for_any_worker_count(shards, corpus_dir, tmp_path):
    meta = json.loads((shards / "meta.json").read_text())
    assert len(meta["shards"]) > 3 and meta["dtype"] == "<u2" and meta["framing"] == "[bos] doc [eos]"
    tok = Tokenizer.load(shards)
    assert tok.sha() == meta["tokenizer"] and meta["documents"]["train"] + meta["documents"]["val"] > 0
    first = np.fromfile(shards / "train" / "00000.bin", dtype="<u2")
    starts = np.load(shards / "train" / "00000.docs.npy")
    assert (first[starts] == tok.bos_id).all() and first[-1] == tok.eos_id
    again = tmp_path / "w2"
    tokenize_source(str(corpus_dir), again, tokenizer=str(shards), val_fraction=0.15, unit_bytes=60_000, workers=2)
    meta2 = json.loads((again / "meta.json").read_text())
    assert [r["train"]["sha256"] for r in meta2["shards"]] == [r["train"]["sha256"] for r in meta["shards"]]
    assert [r["val"]["sha256"] for r in meta2["shards"]] == [r["val"]["sha256"] for r in meta["shards"]]


def test_an_interrupted_tokenize_resumes_and_rewrites_only_what_is_missing(shards, corpus_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "meta.json").unlink()  # interrupted before the end
    (copy / "00002.done.json").unlink()  # shard 2 never finished
    with open(copy / "train" / "00003.bin", "r+b") as fh:  # shard 3 damaged
        fh.write(b"\xff\xff")
    kept = (copy / "train" / "00000.bin").stat().st_mtime_ns
    with pytest.raises(DataError, match="no readable meta.json"):
        build_corpus(load_config(None, [f"data.source=tokens:{copy}"]))
    tokenize_source(str(corpus_dir), copy, val_fraction=0.15, unit_bytes=60_000)
    assert (copy / "train" / "00000.bin").stat().st_mtime_ns == kept  # verified, not rewritten
    assert (
        json.loads((copy / "meta.json").read_text())["shards"]
        == json.loads((shards / "meta.json").read_text())["shards"]
    )


def test_training_from_shards_resumes_bitwise(shards, tiny_base, tmp_path):
    over = _over(tiny_base, f"tokens:{shards}", tmp_path)
    full = train(load_config(None, [*over[:-1], f"train.out_dir={tmp_path / 'full'}"]))
    train(load_config(None, over), stop_at=3)
    resumed = train(load_config(None, [*over, "train.resume=auto"]))
    assert full.losses[3:] == resumed.losses and resumed.final.loss == full.final.loss
    assert (tmp_path / "run" / "tokenizer.model").is_file()  # the shards' own tokenizer


def test_bad_shards_are_refused_before_any_step(shards, corpus_dir, tiny_base, tmp_path):
    other = tmp_path / "other.model"
    from leanlm.engine.data.tokenizer import train_tokenizer

    texts = [f.read_text() for f in sorted(corpus_dir.glob("*.py"))[-3:]]
    other.write_bytes(train_tokenizer(texts, 400).proto)
    with pytest.raises(DataError, match="made with another tokenizer"):
        train(load_config(None, _over(tiny_base, f"tokens:{shards}", tmp_path, [f"data.tokenizer={other}"])))
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    with open(bad / "train" / "00001.bin", "r+b") as fh:
        fh.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match="fails its checksum"):
        train(load_config(None, _over(tiny_base, f"tokens:{bad}", tmp_path)))
    with open(bad / "train" / "00001.bin", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(DataError, match="missing or truncated"):
        train(load_config(None, _over(tiny_base, f"tokens:{bad}", tmp_path)))
    with pytest.raises(DataError, match="leanlm tokenize"):
        train(load_config(None, _over(tiny_base, f"tokens:{tmp_path / 'nowhere'}", tmp_path)))


# ----------------------------------------------------------------------------- other engines' files


def _ids(shards, split="train"):
    return np.concatenate([np.fromfile(p, dtype="<u2") for p in sorted((shards / split).glob("*.bin"))])


def test_nanogpt_llmc_and_megatron_files_train_with_the_same_tokens(shards, corpus_dir, tiny_base, tmp_path):
    train_ids, val_ids = _ids(shards), _ids(shards, "val")
    # nanoGPT: raw uint16 train.bin / val.bin
    (tmp_path / "nano").mkdir()
    train_ids.astype("<u2").tofile(tmp_path / "nano" / "train.bin")
    val_ids.astype("<u2").tofile(tmp_path / "nano" / "val.bin")
    # llm.c: 256 x int32 header (magic, version, count), uint16 tokens
    (tmp_path / "llmc").mkdir()
    for name, ids in (("data_train_000001.bin", train_ids), ("data_val_000000.bin", val_ids)):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, len(ids))
        with open(tmp_path / "llmc" / name, "wb") as fh:
            fh.write(header.tobytes())
            fh.write(ids.astype("<u2").tobytes())
    # Megatron: PREFIX.bin + PREFIX.idx (MMIDIDX v1, uint16 code 8), one sequence per document
    starts = np.flatnonzero(train_ids == 1)
    sizes = np.diff(np.concatenate([starts, [len(train_ids)]])).astype("<i4")
    train_ids[starts[0] :].astype("<u2").tofile(tmp_path / "mg.bin")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1].astype(np.int64) * 2)]).astype("<i8")
    with open(tmp_path / "mg.idx", "wb") as fh:
        fh.write(b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, 8) + struct.pack("<QQ", len(sizes), len(sizes) + 1))
        fh.write(sizes.tobytes() + pointers.tobytes() + np.arange(len(sizes) + 1, dtype="<i8").tobytes())
    tok = f"data.tokenizer={shards / 'tokenizer.model'}"
    reference = build_corpus(load_config(None, _over(tiny_base, f"tokens:{shards}", tmp_path)))
    for spec in (f"nanogpt:{tmp_path / 'nano'}", f"llmc:{tmp_path / 'llmc'}"):
        corpus = build_corpus(load_config(None, _over(tiny_base, spec, tmp_path, [tok])))
        assert corpus.train.n == sum(max(0, (len(a) - 1) // 32) for a in corpus.train.shards)
        assert np.array_equal(corpus.val_tokens, reference.val_tokens)
        assert np.array_equal(np.concatenate([np.asarray(a) for a in corpus.train.shards]), train_ids)
    mg = build_corpus(load_config(None, _over(tiny_base, f"megatron:{tmp_path / 'mg'}", tmp_path, [tok])))
    held = mg.val_tokens
    assert held[0] == 1  # held out from a document start
    res = train(load_config(None, _over(tiny_base, f"llmc:{tmp_path / 'llmc'}", tmp_path, [tok, "train.steps=2"])))
    assert res.step == 2
    with pytest.raises(DataError, match="carry no tokenizer; set data.tokenizer"):
        build_corpus(load_config(None, _over(tiny_base, f"nanogpt:{tmp_path / 'nano'}", tmp_path)))
    small = tmp_path / "small.model"
    from leanlm.engine.data.tokenizer import train_tokenizer

    small.write_bytes(train_tokenizer([f.read_text() for f in sorted(corpus_dir.glob("*.py"))[:3]], 400).proto)
    with pytest.raises(DataError, match="outside data.tokenizer's vocabulary"):
        build_corpus(
            load_config(None, _over(tiny_base, f"nanogpt:{tmp_path / 'nano'}", tmp_path, [f"data.tokenizer={small}"]))
        )
    (tmp_path / "llmc" / "data_train_000001.bin").write_bytes(b"\x00" * 2048)
    with pytest.raises(DataError, match="not an llm.c token file"):
        build_corpus(load_config(None, _over(tiny_base, f"llmc:{tmp_path / 'llmc'}", tmp_path, [tok])))


def test_a_streamed_hf_source_tokenizes_into_shards(corpus_dir, tmp_path, monkeypatch):
    """hf:json over local files (the datasets library's streamed path, offline), through the CLI."""
    from leanlm.engine.cli import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    docs = [f.read_text() for f in sorted(corpus_dir.glob("*.py"))]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "s"
    args = ["tokenize", "hf:json", str(out), "--hf-data-files", str(tmp_path / "docs.jsonl"), "--vocab-size", "512"]
    assert main([*args, "--unit-mb", "0.1", "--val-fraction", "0.2", "--workers", "2"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) > 2 and meta["documents"]["train"] + meta["documents"]["val"] == len(docs)
    assert meta["documents"]["val"] > 0 and meta["source"] == "hf:json"
