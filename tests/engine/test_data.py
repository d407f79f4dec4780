import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from leanlm.engine.config import load_config
from leanlm.engine.data import PackedTokens, build_corpus
from leanlm.engine.data.sources import is_validation, path_source, stdlib_root, stdlib_source
from leanlm.engine.errors import DataError


def test_split_is_a_stable_hash_of_the_key():
    keys = [f"pkg/module_{i}.py" for i in range(20000)]
    held = [k for k in keys if is_validation(k, 0.1)]
    assert held == [k for k in keys if is_validation(k, 0.1)]  # same answer every time
    assert abs(len(held) / len(keys) - 0.1) < 0.01
    assert set(k for k in keys if is_validation(k, 0.05)) <= set(held)  # nested as fraction grows


def test_stdlib_source_finds_the_standard_library():
    src = stdlib_source()
    assert len(src.files) > 500
    assert not any("site-packages" in str(f) for f in src.files)


def test_windows_pack_without_padding_and_overlap_by_one_token():
    tokens = np.arange(101, dtype=np.uint16)
    s = PackedTokens(tokens, seq_len=10, batch_size=4, micro=2, rank=0, world=1, seed=0, shuffle=False)
    (a, b) = s.next_step()
    assert a.shape == (2, 11) and a.dtype == torch.int64
    assert a[0].tolist() == list(range(0, 11)) and a[1].tolist() == list(range(10, 21))
    assert b[0, 0].item() == 20


def test_epoch_visits_every_window_once_in_a_seeded_order():
    tokens = np.arange(201, dtype=np.uint16)
    s = PackedTokens(tokens, seq_len=10, batch_size=5, micro=5, rank=0, world=1, seed=3)
    starts = [row[0].item() for _ in range(4) for batch in s.next_step() for row in batch]
    assert sorted(starts) == list(range(0, 200, 10))
    assert starts != sorted(starts)
    again = PackedTokens(tokens, seq_len=10, batch_size=5, micro=5, rank=0, world=1, seed=3)
    assert [row[0].item() for batch in again.next_step() for row in batch] == starts[:5]


def test_ranks_read_disjoint_rows_that_together_make_the_global_batch():
    tokens = np.arange(1001, dtype=np.uint16)
    single = PackedTokens(tokens, 10, batch_size=8, micro=2, rank=0, world=1, seed=1)
    ranks = [PackedTokens(tokens, 10, batch_size=8, micro=2, rank=r, world=2, seed=1) for r in range(2)]
    for _ in range(3):
        whole = torch.cat(single.next_step())
        parts = [torch.cat(r.next_step()) for r in ranks]
        starts = [set(p[:, 0].tolist()) for p in parts]
        assert not starts[0] & starts[1]
        assert starts[0] | starts[1] == set(whole[:, 0].tolist())


def test_resume_continues_with_the_next_unseen_sequence():
    tokens = np.arange(501, dtype=np.uint16)
    a = PackedTokens(tokens, 10, batch_size=4, micro=4, rank=0, world=1, seed=0)
    for _ in range(3):
        a.next_step()
    b = PackedTokens(tokens, 10, batch_size=4, micro=4, rank=0, world=1, seed=0)
    b.load_state_dict(a.state_dict())
    for _ in range(20):  # crosses epoch boundaries too
        assert torch.equal(a.next_step()[0], b.next_step()[0])


def test_state_from_another_corpus_is_rejected():
    s = PackedTokens(np.arange(501, dtype=np.uint16), 10, batch_size=4, micro=4, rank=0, world=1, seed=0)
    with pytest.raises(DataError, match="different corpus"):
        s.load_state_dict({"kind": "packed_tokens", "position": 3, "n": 7})


def test_file_corpus_is_cached_and_stable(tiny_cfg, tmp_path):
    a = build_corpus(tiny_cfg)
    b = build_corpus(tiny_cfg)
    assert a.tokenizer.sha() == b.tokenizer.sha()
    assert np.array_equal(a.val_tokens, b.val_tokens)
    assert len(a.val_tokens) == tiny_cfg.eval.tokens + 1
    assert a.train_counts.sum() > 10 * len(a.val_tokens)
    assert a.val_tokens[0] == a.tokenizer.bos_id


def test_held_out_documents_never_reach_training(corpus_dir, tiny_cfg, tmp_path):
    corpus = build_corpus(tiny_cfg)
    src = path_source(str(corpus_dir), "text")
    val_text = [p.text for p in src.pieces(tiny_cfg.data.val_fraction) if p.held_out]
    assert val_text, "fixture should hold out at least one piece"
    train_ids = set(
        map(
            tuple,
            np.lib.stride_tricks.sliding_window_view(np.asarray(corpus.train.tokens), 12)[::7].tolist(),
        )
    )
    val_ids = corpus.tokenizer.encode(val_text[0])[:400]
    windows = {tuple(val_ids[i : i + 12]) for i in range(0, len(val_ids) - 12)}
    assert len(windows & train_ids) < len(windows) // 4  # common idioms aside, no shared document


def test_bad_files_are_skipped_with_one_warning_and_empty_corpus_is_an_error(tmp_path, cache_dir):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "empty.txt").write_text("   \n")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    over = [
        f"data.source={root}",
        f"data.cache_dir={cache_dir}",
        "data.vocab_size=300",
        f"train.out_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(DataError, match="no training text|corpus is empty"):
        build_corpus(load_config(None, over))
    for i in range(8):
        (root / f"good{i}.txt").write_text(f"document {i}: hello world, this is real text. " * 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_corpus(load_config(None, [*over, "data.val_fraction=0.3", "train.seq_len=16", "eval.tokens=32"]))
    skipped = [w for w in caught if "skipped documents" in str(w.message)]
    assert len(skipped) == 1 and "1 empty" in str(skipped[0].message) and "1 not UTF-8" in str(skipped[0].message)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        build_corpus(load_config(None, [f"data.source={tmp_path / 'nope'}"]))


def _write_jsonl(path, n=300):
    rng = np.random.default_rng(0)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": i, "text": " ".join(rng.choice(words, 60))}) + "\n")


def test_jsonl_and_parquet_sources(tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "a.jsonl")
    pq.write_table(
        pa.table({"body": [f"parquet text number {i} " * 30 for i in range(200)]}),
        tmp_path / "b.parquet",
    )
    docs = list(path_source(str(tmp_path / "a.jsonl"), "text").documents())
    assert len(docs) == 300 and docs[0][0] == "a.jsonl:0"
    assert len(list(path_source(str(tmp_path / "b.parquet"), "body").documents())) == 200
    with pytest.raises(DataError, match="no column 'text'"):
        list(path_source(str(tmp_path / "b.parquet"), "text").documents())


def test_hf_streaming_source_packs_and_resumes(tmp_path, cache_dir):
    _write_jsonl(tmp_path / "train.jsonl", 400)
    over = [
        "data.source=hf:json",
        f"data.hf_data_files=[{tmp_path / 'train.jsonl'}]",
        "data.hf_val_split=",
        "data.val_fraction=0.1",
        "data.vocab_size=300",
        "data.hf_shuffle_buffer=16",
        f"data.cache_dir={cache_dir}",
        "train.seq_len=16",
        "train.batch_size=4",
        "eval.tokens=64",
    ]
    cfg = load_config(None, over)
    a = build_corpus(cfg)
    assert len(a.val_tokens) == 65
    for _ in range(5):
        a.train.next_step()
    state = a.train.state_dict()
    expected = [a.train.next_step()[0] for _ in range(5)]
    b = build_corpus(cfg)
    b.train.load_state_dict(state)
    got = [b.train.next_step()[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))
    assert expected[0].shape == (4, 17)


def test_trained_tokenizer_is_cached_by_content(tiny_cfg, cache_dir):
    first = build_corpus(tiny_cfg).tokenizer
    cached = list((cache_dir / "tokenizers").glob("*.model"))
    assert cached and any(p.read_bytes() == first.proto for p in cached)
    assert build_corpus(tiny_cfg).tokenizer.sha() == first.sha()


def test_forced_tokenizer_file_wins(tiny_cfg, tmp_path):
    from leanlm.engine.data.tokenizer import train_tokenizer

    other = train_tokenizer(["some other text entirely, with words " * 50] * 20, 320)
    other.save_to(tmp_path)
    assert build_corpus(tiny_cfg, tmp_path / "tokenizer.model").tokenizer.sha() == other.sha()
    assert build_corpus(tiny_cfg, tmp_path).tokenizer.sha() == other.sha()  # a folder holding it


def _text_corpus(root: Path, n_lines: int) -> str:
    """Real text (stdlib source) joined into one string of about ``n_lines`` lines."""
    lines: list[str] = []
    for f in sorted(stdlib_root().glob("*.py")):
        lines += f.read_text(encoding="utf-8", errors="replace").splitlines()
        if len(lines) >= n_lines:
            break
    return "\n".join(lines[:n_lines]) + "\n"


@pytest.mark.parametrize("layout", ["single_file", "one_big_document"])
def test_a_single_document_corpus_trains_with_a_byte_range_split(tmp_path, cache_dir, layout):
    """F5: one file (or one document of a folder) is split and sampled by byte ranges: both
    splits have text, the held-out share matches val_fraction, and no held-out piece trains."""
    text = _text_corpus(tmp_path, 12000)
    if layout == "single_file":
        src = tmp_path / "single.txt"
    else:
        (tmp_path / "big").mkdir()
        src = tmp_path / "big" / "all.txt"
        text = text.replace("\n", " ")  # one line, no newline to cut at
    src.write_text(text)
    over = [
        f"data.source={src if layout == 'single_file' else src.parent}",
        f"data.cache_dir={cache_dir}",
        "data.vocab_size=512",
        "data.tokenizer_sample_mb=0.05",
        "train.seq_len=32",
        "eval.tokens=256",
    ]
    cfg = load_config(None, over)
    corpus = build_corpus(cfg)
    pieces = list(path_source(str(src), "text").pieces(cfg.data.val_fraction))
    held = sum(len(p.text) for p in pieces if p.held_out)
    assert 0 < held / len(text) < 3 * cfg.data.val_fraction
    assert "".join(p.text for p in pieces) == text  # the pieces tile the document
    n_train = corpus.train.n
    assert n_train > 0 and len(corpus.val_tokens) == 257
    bos, eos = corpus.tokenizer.bos_id, corpus.tokenizer.eos_id
    train = np.asarray(corpus.train.tokens)
    assert (train == bos).sum() == (train == eos).sum() <= sum(p.bos for p in pieces if not p.held_out)


def test_many_documents_keep_the_whole_document_hash_split():
    src = stdlib_source()
    assert not src.by_byte_ranges(0.02)  # thousands of files: whole documents, as before
    assert src.by_byte_ranges(0.0) is False


def test_damaged_token_cache_is_detected_and_rebuilt(tiny_cfg, tmp_path):
    """F19: truncation (a partial token would shift every later one), a flipped byte of the same
    size, and a corrupt meta.json are each noticed, warned about and rebuilt."""
    cfg = tiny_cfg
    cfg.data.cache_dir = str(tmp_path / "cache")
    good = np.asarray(build_corpus(cfg).train.tokens).copy()
    folder = next((tmp_path / "cache" / "tokens").iterdir())

    def damage_size():
        with open(folder / "train.bin", "r+b") as fh:
            fh.truncate(fh.seek(0, 2) - 1)

    def damage_byte():
        data = bytearray((folder / "train.bin").read_bytes())
        data[100] ^= 0xFF
        (folder / "train.bin").write_bytes(bytes(data))

    def damage_meta():
        (folder / "meta.json").write_text("{")

    for damage, why in (
        (damage_size, "wrong size"),
        (damage_byte, "checksum"),
        (damage_meta, "meta.json"),
    ):
        damage()
        with pytest.warns(UserWarning, match=f"token cache .* is damaged .*{why}"):
            again = build_corpus(cfg)
        assert np.array_equal(np.asarray(again.train.tokens), good)
