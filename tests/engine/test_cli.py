import subprocess
import sys
from pathlib import Path

import pytest

from leanlm.engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_key_is_one_line_and_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", TINY, "optim.lrr=1", f"train.out_dir={tmp_path}")
    assert code == 2
    assert err.strip().count("\n") == 0 and "did you mean 'lr'" in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2 and "not found" in err


def test_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "neither a checkpoint folder nor a run folder" in err


def test_train_then_eval_and_generate(capsys, tiny_overrides, tmp_path):
    code, out, _ = run_cli(capsys, "train", TINY, *tiny_overrides)
    assert code == 0
    assert "held-out loss" in out and "unigram baseline" in out
    run = tmp_path / "run"
    code, out, _ = run_cli(capsys, "eval", str(run), "eval.tokens=256")
    assert code == 0 and "perplexity" in out and "on 256 tokens" in out
    code, out, _ = run_cli(
        capsys,
        "generate",
        str(run / "checkpoints" / "step-00000006"),
        "--prompt",
        "def ",
        "--max-new-tokens",
        "5",
    )
    assert code == 0 and out.startswith("def ")
    code, _, err = run_cli(capsys, "eval", str(run), "model.d_model=8")
    assert code == 2 and "can be overridden" in err


def test_keys_lists_every_section(capsys):
    code, out, _ = run_cli(capsys, "keys")
    assert code == 0
    for section in (
        "model.",
        "data.",
        "optim.",
        "train.",
        "eval.",
        "checkpoint.",
        "log.",
        "distributed.",
    ):
        assert section in out


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "leanlm.engine.cli"]
    proc = subprocess.run(
        [*exe, "train", TINY, "train.steps=0", f"train.out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "train.steps=0: must be > 0" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
