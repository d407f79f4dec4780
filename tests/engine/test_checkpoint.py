import pytest
import torch

from leanlm.engine import checkpoint as ckpt
from leanlm.engine.errors import CheckpointError


def _save(run, step, keep=0):
    tensors = {
        "model": {"w": torch.full((3,), float(step))},
        "train": {"step": step, "rng": torch.get_rng_state()},
    }
    return ckpt.save_checkpoint(run, step, tensors, {"config.yaml": b"model: {}\n"}, keep=keep)


def test_save_writes_an_atomic_folder_with_a_manifest(tmp_path):
    path = _save(tmp_path, 5)
    assert path.name == "step-00000005"
    assert {p.name for p in path.iterdir()} == {
        "model.pt",
        "train.pt",
        "config.yaml",
        "manifest.json",
    }
    manifest = ckpt.verify(path)
    assert manifest["step"] == 5 and set(manifest["files"]) == {
        "model.pt",
        "train.pt",
        "config.yaml",
    }
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_files_load_with_weights_only(tmp_path):
    path = _save(tmp_path, 2)
    assert torch.equal(ckpt.load_file(path, "model")["w"], torch.full((3,), 2.0))
    assert ckpt.load_file(path, "train")["step"] == 2


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_auto_resume_skips_a_truncated_newest_checkpoint(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="step 2.*truncated or corrupt"):
        found = ckpt.resolve_resume(tmp_path, "auto")
    assert found.name == "step-00000001"


def test_incomplete_temp_folder_is_ignored(tmp_path):
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".tmp-step-00000009-123").mkdir()
    (tmp_path / "checkpoints" / "step-00000010").mkdir()  # no manifest: a crash mid-rename elsewhere
    with pytest.warns(UserWarning, match="no manifest"):
        assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000001"


def test_explicit_bad_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "nope"))
    assert ckpt.resolve_resume(tmp_path, "none") is None
    assert ckpt.resolve_resume(tmp_path, "auto") is None


def test_model_shape_mismatch_names_the_tensor():
    model = torch.nn.Linear(3, 2, bias=False)
    with pytest.raises(CheckpointError, match=r"weight has shape \(4, 3\)"):
        ckpt.load_model_state(model, {"weight": torch.zeros(4, 3)}, "ckpt")
