"""Every bad input is one ``leanlm: error:`` line with exit 2 (reliability findings F9-F12,
F15-F18 and the "unclear" cases 6b1, 6b3, 6f4, 9d): configs, CLI numbers, output paths,
scaling records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from leanlm.engine.cli import main
from leanlm.engine.config import load_config
from leanlm.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:  # argparse exits; main() returns
        raise SystemExit(main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("warning:")]
    assert exit_info.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("leanlm: error:"), err
    for fragment in fragments:
        assert fragment in err[0], err
    return err[0]


@pytest.mark.parametrize(
    "text,fragment",
    [
        (b"train:\n  out_dir: caf\xe9\n", "not UTF-8"),
        (b"extends: 5\n", "extends must be one preset file name"),
        (b"extends: [tiny.yaml]\n", "extends must be one preset file name"),
        (b"train: 5\n", "'train' must be a mapping"),
        (b"model:\n  lost: 3\n", "'model.lost' must be a mapping"),
    ],
)
def test_bad_config_files(capsys, tmp_path, text, fragment):
    """F9, F12: non-UTF-8 files, non-string extends, scalar sections (silently dropped before)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(text)
    one_line_error(capsys, ["train", str(cfg), "train.steps=1", f"train.out_dir={tmp_path}/r"], fragment)
    assert not (tmp_path / "r").exists()


def test_list_overrides_are_coerced_to_their_element_type():
    """F12: optim.betas=0.9,0.95 on the command line is two numbers, not two strings."""
    assert load_config(None, ["optim.betas=0.9,0.95"]).optim.betas == [0.9, 0.95]
    assert load_config(None, ["optim.betas=[0.8, 0.99]"]).optim.betas == [0.8, 0.99]
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]='x': expected a number"):
        load_config(None, ["optim.betas=0.9,x"])


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("model.vocab_size=1000000000", "model.vocab_size=1000000000: must be in [0, 2,097,152]"),
        ("train.threads=-1", "train.threads=-1: must be >= 0"),
    ],
)
def test_values_without_a_bound_are_refused(capsys, tmp_path, override, fragment):
    """F11: no 256 GB allocation, no torch RuntimeError."""
    one_line_error(capsys, ["train", TINY, override, f"train.out_dir={tmp_path}/r"], fragment)


def test_weights_that_cannot_fit_are_refused_before_allocating(capsys, tiny_overrides, monkeypatch):
    """F11: a model bigger than the free memory gets a line, not an OOM kill."""
    import leanlm.engine.build as build

    monkeypatch.setattr(build, "available_memory_bytes", lambda device: 1000)
    one_line_error(capsys, ["train", TINY, *tiny_overrides], "GiB free; shrink model.*")


def test_too_small_vocab_says_how_large_it_must_be(capsys, tiny_overrides, tmp_path):
    """F12: validation admits 300, the corpus needs more: the error says raise, with the number."""
    line = one_line_error(
        capsys,
        ["train", TINY, *tiny_overrides, "data.vocab_size=300", f"data.cache_dir={tmp_path}/c"],
        "data.vocab_size=300 is too small",
        "raise data.vocab_size",
    )
    assert "lower" not in line


def test_read_only_out_dir_fails_before_the_corpus_is_built(capsys, tiny_base, tmp_path):
    """F10 (a read-only bind mount needs root; a folder where the run folder should be works
    everywhere and fails the same way)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(capsys, ["train", TINY, *tiny_base, f"train.out_dir={blocker}/run"], "cannot write there")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode:
        return
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        one_line_error(
            capsys,
            [
                "train",
                TINY,
                *tiny_base,
                f"train.out_dir={ro}/run",
                f"data.cache_dir={tmp_path}/fresh",
            ],
            "Read-only file system",
        )
        assert not (tmp_path / "fresh").exists()  # refused before any tokenizing
    finally:
        if subprocess.run(["umount", str(ro)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--temperature", "nan"], "--temperature: 'nan' must be a finite number >= 0"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--top-k", "-5"], "--top-k"),
    ],
)
def test_generate_refuses_bad_numbers(capsys, tmp_path, argv, fragment):
    """F18, 6b1, 6b3 (checked before any checkpoint is read)."""
    one_line_error(capsys, ["generate", str(tmp_path), *argv], fragment)


@pytest.mark.parametrize("extra", [[], ["distributed.backend=fsdp2"]])
@pytest.mark.parametrize("world", ["0", "-2"])
def test_memory_refuses_a_world_below_one(capsys, extra, world):
    """F18."""
    one_line_error(capsys, ["memory", TINY, *extra, "--world", world], "--world")


@pytest.fixture
def synthetic_runs(tmp_path) -> Path:
    rows = [
        dict(
            model_name=f"m{int(n)}",
            num_params=n,
            tokens_seen=d,
            step=i + 1,
            val_loss=1.7 + 400 / n**0.34 + 410 / d**0.28,
        )
        for n in (1e6, 3e6, 1e7, 3e7)
        for i, d in enumerate((1e7, 3e7, 1e8, 3e8, 1e9))
    ]
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "scaling.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "syn"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--predict", "-1", "-5"], "--predict: '-1'"),
        (["--predict", "0", "0"], "--predict: '0'"),
        (["--budget", "-1"], "--budget: '-1'"),
        (["--budget", "nan"], "--budget: 'nan'"),
        (["--bootstrap", "-3"], "--bootstrap: '-3'"),
        (["--drop-fraction", "-0.1"], "--drop-fraction"),
    ],
)
def test_fit_refuses_impossible_numbers(capsys, synthetic_runs, argv, fragment):
    """F17, 6f4."""
    one_line_error(capsys, ["fit", str(synthetic_runs), "--grid", "small", *argv], fragment)


def test_bad_output_paths_are_refused_before_any_work(capsys, synthetic_runs, tmp_path, monkeypatch):
    """F16: before fitting, not after."""
    import leanlm.engine.scaling as scaling

    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("fitted before checking --json"))
    one_line_error(capsys, ["fit", str(synthetic_runs), "--json", f"{tmp_path}/nodir/x.json"], "does not exist")
    one_line_error(capsys, ["scaling", "export", str(synthetic_runs), "--csv", str(tmp_path)], "is a folder")
    no_dir = f"{tmp_path}/no/o.csv"
    one_line_error(capsys, ["scaling", "export", str(synthetic_runs), "--csv", no_dir], "does not exist")


def test_torn_and_garbage_scaling_lines_are_skipped_with_a_warning(capsys, synthetic_runs, tmp_path):
    """F15: what a crash mid-append leaves, and lines that are not records at all."""
    path = synthetic_runs / "scaling.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "broken\nnot json\n5\n[]\n')
    with pytest.warns(UserWarning, match="skipped 4 line"):
        assert main(["scaling", "export", str(synthetic_runs), "--csv", str(tmp_path / "o.csv")]) == 0
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 21
    with pytest.warns(UserWarning, match="skipped 4 line"):
        assert main(["fit", str(synthetic_runs), "--grid", "small"]) == 0


def test_malformed_fault_injection_spec_is_refused_at_start(capsys, tiny_overrides, monkeypatch):
    """9d: LEANLM_FAULT_AT (a test aid) is parsed before training, not after step 1."""
    monkeypatch.setenv("LEANLM_FAULT_AT", "three")
    one_line_error(capsys, ["train", TINY, *tiny_overrides], "LEANLM_FAULT_AT='three'")


def test_hf_source_on_a_black_holed_network_fails_fast(tmp_path):
    """F13: a proxy that accepts and never answers (loopback only) -> one line within seconds,
    not after ~7 minutes of retries."""
    import os
    import socket
    import sys
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    dropped = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NO_PROXY")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(dropped)}
    env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy)
    env["HF_HOME"] = str(tmp_path / "hf")
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "leanlm.engine.cli",
                "train",
                TINY,
                "data.source=hf:some/name",
                "data.hf_timeout_s=2",
                f"train.out_dir={tmp_path / 'run'}",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("leanlm:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and "did not answer within 2s" in err[0], proc.stderr[-2000:]
    assert time.monotonic() - start < 60
