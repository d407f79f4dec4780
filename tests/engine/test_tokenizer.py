import pytest

from leanlm.engine.data.tokenizer import Tokenizer, train_tokenizer
from leanlm.engine.errors import DataError

CODE = '''def add(a, b):
    """Add two numbers."""
    if a is None:
        return b   # trailing spaces and tabs\t matter
    return a + b
'''


@pytest.fixture(scope="module")
def tok(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))]
    return train_tokenizer(texts, vocab_size=600)


def test_trained_tokenizer_has_requested_vocab_and_special_ids(tok):
    assert tok.vocab_size == 600
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_round_trip_keeps_code_whitespace_exactly(tok):
    assert tok.decode(tok.encode(CODE)) == CODE


def test_unseen_characters_round_trip_through_byte_fallback(tok):
    text = "zebra ✓ 日本語 🦓"
    assert tok.decode(tok.encode(text)) == text
    assert 0 not in tok.encode(text)  # never <unk>


def test_documents_are_framed_with_bos_and_eos(tok):
    (ids,) = tok.encode_documents(["x = 1"])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    tok.save_to(tmp_path)
    for path in (tmp_path / "tokenizer.model", tmp_path):  # the file, or the folder holding it
        loaded = Tokenizer.load(path)
        assert loaded.sha() == tok.sha() and loaded.encode(CODE) == tok.encode(CODE)


def test_training_is_deterministic(corpus_dir):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:5]]
    assert train_tokenizer(texts, 400).sha() == train_tokenizer(texts, 400).sha()


def test_missing_or_bad_tokenizer_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_too_small_vocab_fails_with_a_fix():
    with pytest.raises(DataError, match="lower data.vocab_size|use more text"):
        train_tokenizer(["tiny text"], vocab_size=5000)
