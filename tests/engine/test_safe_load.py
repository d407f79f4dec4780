"""No checkpoint runs code (reliability findings F1, F2): a pickle payload planted in any file a
load path opens must not run, and the command must exit 2 with one line naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from leanlm.engine.checkpoint.safe_load import read_dcp_metadata, scan_torch_files
from leanlm.engine.cli import main
from leanlm.engine.config import load_config
from leanlm.engine.errors import CheckpointError
from leanlm.engine.trainer import train

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def reseal(ck: Path) -> None:
    """Rewrite the manifest so the planted files verify (an attacker writes the manifest too)."""
    m = json.loads((ck / "manifest.json").read_text())
    for f in ck.rglob("*"):
        if f.is_file() and f.name != "manifest.json":
            data = f.read_bytes()
            rel = f.relative_to(ck).as_posix()
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ck / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safe") / "run"
    train(load_config(TINY, [*tiny_base, f"train.out_dir={run}", "train.steps=3"]))
    return run


def plant(trained: Path, dst: Path, files: dict[str, object]) -> Path:
    """A copy of the run whose newest checkpoint carries ``files`` (relative path -> object)."""
    shutil.copytree(trained, dst)
    ck = dst / "checkpoints" / "step-00000003"
    for rel, obj in files.items():
        (ck / rel).parent.mkdir(parents=True, exist_ok=True)
        (ck / rel).write_bytes(pickle.dumps(obj) if not isinstance(obj, bytes) else obj)
    reseal(ck)
    return dst


def _one_line_error(capsys, code: int, name: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("leanlm: error:") and name in err[0], err


PLANTS = {
    "dcp": lambda m: {"dcp/.metadata": Payload(m)},
    "deepspeed": lambda m: {
        "deepspeed/state/mp_rank_00_model_states.pt": Payload(m),
        "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt": Payload(m),
        "deepspeed/latest": b"state",
    },
    "model.pt": lambda m: {"model.pt": Payload(m)},
}


@pytest.mark.parametrize("kind", sorted(PLANTS))
@pytest.mark.parametrize("command", ["eval", "generate", "resume"])
def test_planted_payload_does_not_run(trained, tmp_path, capsys, tiny_base, kind, command):
    marker = tmp_path / "PWNED"
    run = plant(trained, tmp_path / "run", PLANTS[kind](marker))
    ck = run / "checkpoints" / "step-00000003"
    if command == "resume":
        argv = [
            "train",
            TINY,
            *tiny_base,
            f"train.out_dir={run}",
            "train.resume=auto",
            "train.steps=5",
        ]
        argv.append("checkpoint.every=0")
    else:
        argv = [command, str(ck)]
    code = main(argv)
    assert not marker.exists(), f"code ran from the planted {kind}"
    name = {"dcp": ".metadata", "deepspeed": "deepspeed/state/", "model.pt": "model.pt"}[kind]
    _one_line_error(capsys, code, name)


def test_optimizer_and_train_state_payloads_do_not_run(trained, tmp_path, capsys, tiny_base):
    for name in ("optim.pt", "train.pt"):
        marker = tmp_path / f"PWNED_{name}"
        run = plant(trained, tmp_path / name, {name: Payload(marker)})
        argv = ["train", TINY, *tiny_base, f"train.out_dir={run}", "train.resume=auto"]
        code = main([*argv, "train.steps=5"])
        assert not marker.exists()
        _one_line_error(capsys, code, name)


def test_dcp_metadata_declaring_pickled_bytes_is_refused(tmp_path):
    """Metadata made only of allowed classes may still declare a byte item, which torch's planner
    would ``torch.load(weights_only=False)``: refused before any data is read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    folder = tmp_path / "dcp"
    dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=str(folder))
    meta = read_dcp_metadata(folder)  # a genuine file passes
    meta.state_dict_metadata["model.w"] = BytesStorageMetadata()
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        read_dcp_metadata(folder)


def test_scan_admits_plain_tensor_files_and_names_the_bad_one(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "ok.pt")
    (tmp_path / "notes.txt").write_text("not a pickle")
    scan_torch_files(tmp_path, "ck")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.bin").write_bytes(pickle.dumps(Payload(tmp_path / "m")))
    with pytest.raises(CheckpointError, match=r"sub/x\.bin"):
        scan_torch_files(tmp_path, "ck")
    assert not (tmp_path / "m").exists()
    assert os.listdir(tmp_path)  # nothing removed
