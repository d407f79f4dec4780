"""Document sources: where raw text comes from, before tokenization.

A source yields ``(key, text)`` documents. File sources (the built-in ``stdlib`` corpus, local
files and folders) are split into train/validation by a stable hash of each document's key, so
the split never changes between runs, machines or world sizes. HF ``datasets`` sources stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.engine.errors import DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".md", ".py")


def is_validation(key: str, fraction: float) -> bool:
    """Stable split: the document is held out iff its key hashes below ``fraction``."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


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


def stdlib_source() -> FileSource:
    """The running Python's standard library ``.py`` files (~30 MB of real text, everywhere)."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    if not files:
        raise DataError(
            f"no .py files found under the standard library at {root}; use data.source=PATH"
        )
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
