"""Document sources: where raw text comes from, before tokenization.

A source yields ``(key, text)`` documents. File sources (the built-in ``stdlib`` corpus, local
files and folders) are split into train/validation by a stable hash of each document's key, so
the split never changes between runs, machines or world sizes. HF ``datasets`` sources stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from leanlm.engine.errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md", ".py")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")  # many documents per file

# Hash-splitting whole documents needs enough of them: with n documents and held-out fraction f
# the held-out split is empty with probability (1 - f)^n (5% for 150 files at 2%). Below this
# expected number of held-out documents, plain-text sources are split by byte ranges instead.
MIN_EXPECTED_HELD_OUT = 8
# A document above this size is always split by byte ranges (a 50 MB text must not land in
# held-out whole, or reach the tokenizer sample all or nothing).
BIG_DOCUMENT_CHARS = 8 << 20
PIECES_PER_DOCUMENT = 256  # byte-range pieces are len / 256 characters, within the bounds below
MIN_PIECE_CHARS, MAX_PIECE_CHARS = 4 << 10, 1 << 20


def is_validation(key: str, fraction: float) -> bool:
    """Stable split: the document is held out iff its key hashes below ``fraction``."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


@dataclass
class Piece:
    """A unit of the train/held-out split: a whole document, or a byte range of one.

    ``bos`` / ``eos``: whether this piece starts / ends a stretch of contiguous text (frame it
    there); pieces of one document that stay together in one split are joined unframed."""

    key: str
    text: str
    held_out: bool
    _: KW_ONLY
    bos: bool = True
    eos: bool = True


def cut_at_lines(text: str, size: int) -> list[str]:
    """Consecutive pieces of about ``size`` characters, cut after a newline where there is one."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start + size // 2, end)
            end = nl + 1 if nl >= 0 else end
        out.append(text[start:end])
        start = end
    return out


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class FileSource:
    """Text files under a root: every ``.py`` file of the stdlib, or user .txt/.jsonl/.parquet."""

    root: Path
    files: list[Path]
    text_field: str = "text"
    skipped: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Changes whenever a file is added, removed or modified (size or mtime)."""
        h = hashlib.sha256(str(self.root).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        h.update(self.text_field.encode())
        return h.hexdigest()[:16]

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (key, text); unreadable, non-UTF-8 or empty documents are counted, not raised."""
        self.skipped = {}
        for path in self.files:
            rel = path.relative_to(self.root).as_posix() if path != self.root else path.name
            try:
                if path.suffix == ".parquet":
                    yield from self._parquet(path, rel)
                elif path.suffix in (".jsonl", ".json"):
                    yield from self._jsonl(path, rel)
                else:
                    text = path.read_bytes().decode("utf-8")
                    if text.strip():
                        yield rel, text
                    else:
                        self._skip("empty")
            except UnicodeDecodeError:
                self._skip("not UTF-8")
            except OSError:
                self._skip("unreadable")

    def by_byte_ranges(self, fraction: float) -> bool:
        """Whether every document is split by byte ranges: plain-text files too few for a
        hash split to hold out reliably (fewer than ``MIN_EXPECTED_HELD_OUT`` expected)."""
        if any(f.suffix in RECORD_SUFFIXES for f in self.files):
            return False
        return 0 < fraction and len(self.files) * fraction < MIN_EXPECTED_HELD_OUT

    def pieces(self, fraction: float) -> Iterator[Piece]:
        """The documents as split units: whole documents held out by a stable hash of their key,
        or (``by_byte_ranges``, or a document over ``BIG_DOCUMENT_CHARS``) pieces of about 1/256
        of a document, of which an evenly spaced ``fraction`` is held out (at least one)."""
        ranges, j = self.by_byte_ranges(fraction), 0
        for key, text in self.documents():
            if not ranges and len(text) <= BIG_DOCUMENT_CHARS:
                yield Piece(key, text, is_validation(key, fraction))
                continue
            parts = document_parts(text)
            held = []
            for _ in parts:  # piece j is held out when j·f crosses an integer: ceil(n·f) of n
                held.append(math.ceil((j + 1) * fraction) > math.ceil(j * fraction))
                j += 1
            yield from framed_pieces(key, parts, held)

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def _jsonl(self, path: Path, rel: str) -> Iterator[tuple[str, str]]:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    self._skip("bad JSON line")
                    continue
                text = rec.get(self.text_field) if isinstance(rec, dict) else None
                if isinstance(text, str) and text.strip():
                    yield f"{rel}:{i}", text
                else:
                    self._skip(f"no '{self.text_field}' field")

    def _parquet(self, path: Path, rel: str) -> Iterator[tuple[str, str]]:
        import pyarrow.parquet as pq  # ships with `datasets`

        pf = pq.ParquetFile(path)
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(
                f"{path}: no column '{self.text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                "set data.text_field"
            )
        i = 0
        for batch in pf.iter_batches(columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield f"{rel}:{i}", text
                else:
                    self._skip("empty")
                i += 1

    def warn_skipped(self) -> None:
        if self.skipped:
            parts = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            warnings.warn(f"data: skipped documents under {self.root}: {parts}", stacklevel=2)


def document_parts(text: str) -> list[str]:
    """A document cut at line ends into pieces of about 1/256 of it (within the size bounds)."""
    size = min(MAX_PIECE_CHARS, max(MIN_PIECE_CHARS, len(text) // PIECES_PER_DOCUMENT))
    return cut_at_lines(text, size)


def framed_pieces(key: str, parts: list[str], held: list[bool]) -> Iterator[Piece]:
    """A cut document's pieces: BOS where a stretch of one split begins, EOS where it ends."""
    for i, part in enumerate(parts):
        bos = i == 0 or held[i - 1] != held[i]
        eos = i == len(parts) - 1 or held[i + 1] != held[i]
        yield Piece(f"{key}@{i}", part, held[i], bos=bos, eos=eos)


def stdlib_source() -> FileSource:
    """The running Python's standard library ``.py`` files (~30 MB of real text, everywhere)."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise DataError(f"no .py files found under the standard library at {root}; use data.source=PATH")
    return FileSource(root=root, files=files)


def path_source(spec: str, text_field: str) -> FileSource:
    """A file, or every supported file under a folder (sorted, recursively)."""
    root = Path(spec).expanduser()
    if not root.exists():
        raise DataError(f"data.source={spec!r}: no such file or folder")
    if root.is_file():
        return FileSource(root=root.parent, files=[root], text_field=text_field)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
    if not files:
        raise DataError(f"data.source={spec!r}: no {', '.join(FILE_SUFFIXES)} files in this folder")
    return FileSource(root=root, files=files, text_field=text_field)


def parse_hf(spec: str) -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]`` -> (name, config)."""
    body = spec[3:]
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"data.source={spec!r}: expected hf:NAME[:CONFIG], e.g. hf:allenai/c4:en")
    return name, config or None


def _offline() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def check_hub(spec: str, timeout_s: float) -> None:
    """Fail fast, within ``timeout_s``, when the Hub cannot be reached for ``hf:NAME``.

    ``datasets`` retries a dead network for minutes (407 s through a proxy that never answers);
    one metadata request with a connect + read timeout tells the user in seconds. Skipped offline
    (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``), for local folders and for packaged builders
    such as ``hf:json`` with ``data.hf_data_files``. The same timeout then applies to the Hub's
    own requests."""
    name, _ = parse_hf(spec)
    if _offline() or Path(name).expanduser().exists():
        return
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        _PACKAGED_DATASETS_MODULES = {}
    if name in _PACKAGED_DATASETS_MODULES:
        return
    import huggingface_hub
    from huggingface_hub import HfApi

    constants: Any = huggingface_hub.constants  # declared int there; requests takes float seconds
    constants.HF_HUB_ETAG_TIMEOUT = timeout_s
    constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout_s
    try:
        HfApi().dataset_info(name, timeout=timeout_s)
    except Exception as e:
        kind = type(e).__name__
        if "RepositoryNotFound" in kind:
            why = "no such dataset on the Hub (or it is private: log in with `hf auth login`)"
        elif "GatedRepo" in kind:
            why = "the dataset is gated: accept its terms on the Hub and log in"
        elif "HTTPError" in kind and "Timeout" not in kind:
            why = f"the Hub refused ({str(e).strip().splitlines()[0][:120] if str(e).strip() else kind})"
        else:
            why = (
                f"the Hugging Face Hub did not answer within {timeout_s:g}s ({kind}); check the "
                "network or proxy, raise data.hf_timeout_s, or set HF_DATASETS_OFFLINE=1 to use "
                "the local cache"
            )
        raise DataError(f"data.source={spec!r}: {why}") from None


def hf_stream(spec: str, split: str, data_files: list[str] | None = None):
    """Open an HF dataset split as a streaming ``IterableDataset``."""
    import datasets

    name, config = parse_hf(spec)
    kwargs = {"data_files": list(data_files)} if data_files else {}
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except (ValueError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data.source={spec!r} split {split!r}: {msg}") from None
    except (FileNotFoundError, ConnectionError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"data.source={spec!r}: cannot open ({msg}); check the name, network access or data.hf_data_files"
        ) from None
