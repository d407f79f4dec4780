from pathlib import Path

import pytest

from leanlm.engine.config import describe_keys, load_config, parse_overrides
from leanlm.engine.errors import ConfigError

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.train.steps > 0


def test_overrides_are_coerced_to_field_types():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "train.steps=20",
            "log.tensorboard=false",
            "optim.betas=[0.8, 0.9]",
            "train.batch_size=1e2",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 20 and cfg.train.batch_size == 100
    assert cfg.log.tensorboard is False
    assert cfg.optim.betas == [0.8, 0.9]


def test_unknown_key_gets_a_did_you_mean_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' \(did you mean 'lr'\?\)"):
        load_config(None, ["optim.lrr=1e-3"])


def test_unknown_section_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        load_config(None, ["trian.steps=3"])


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "train.steps=-1",
                "optim.lr=abc",
                "model.d_model=100",
                "model.n_heads=3",
                "optim.name=sgdd",
            ],
        )
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in (
        "train.steps=-1",
        "optim.lr='abc': expected a number",
        "not divisible by model.n_heads=3",
        "optim.name='sgdd'",
    ):
        assert fragment in msg


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size"):
        load_config(None, ["train.batch_size=10", "train.micro_batch_size=4"])


def test_extends_merges_parent_preset(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 128\n  n_heads: 2\ntrain:\n  steps: 7\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\ntrain:\n  steps: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.d_model == 128 and cfg.train.steps == 9


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["steps"])


def test_every_key_is_documented():
    rows = describe_keys()
    assert all(help_ for _, _, help_ in rows)
    assert {
        "train.steps",
        "train.batch_size",
        "train.seq_len",
        "optim.name",
        "optim.lr",
        "data.source",
        "train.resume",
        "train.out_dir",
    } <= {k for k, _, _ in rows}


def test_grad_accum_is_derived_from_world_size():
    cfg = load_config(None, ["train.batch_size=32", "train.micro_batch_size=4"])
    assert cfg.train.grad_accum_steps(1) == 8 and cfg.train.grad_accum_steps(2) == 4


def test_readme_documents_every_config_key():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [key for key, _, _ in describe_keys() if f"`{key}`" not in readme]
    assert not missing, f"README.md lacks {missing}; regenerate with scripts/config_keys.py"


def test_config_choices_match_their_owners_constants():
    """The config is torch-free, so its choices restate the owners' names: they must agree."""
    import dataclasses

    from leanlm.engine.config import SECTION_TYPES, leaves
    from leanlm.engine.reweight import STRATEGIES
    from leanlm.kernels.dispatch import PHIS
    from leanlm.optim.lost import SELECTORS, SUPPORTS, VALUES_INIT
    from leanlm.optim.options import STATE_FREE
    from leanlm.optim.projections import BLOCK_ORDERS, PROJECTIONS
    from leanlm.optim.registry import REGISTRY
    from leanlm.optim.scaled import SCALINGS

    owners = {
        "model.lost.phi": PHIS,
        "model.lost.select": SELECTORS,
        "model.lost.values_init": VALUES_INIT,
        "model.lost.support": SUPPORTS,
        "optim.name": tuple(REGISTRY),
        "optim.projection": PROJECTIONS,
        "optim.state_free": STATE_FREE,
        "optim.block_order": BLOCK_ORDERS,
        "optim.scaling": SCALINGS,
        "train.reweight.strategy": STRATEGIES,
    }
    choices = {
        key: f.metadata["choices"]
        for name, cls in SECTION_TYPES.items()
        for key, f, _ in leaves(cls(), name)
        if f.metadata.get("choices")
    }
    for key, names in owners.items():
        assert tuple(choices[key]) == tuple(names), key
    # every optimizer setting the registry reads exists in the config
    fields = {f.name for f in dataclasses.fields(SECTION_TYPES["optim"])}
    for name, entry in REGISTRY.items():
        assert set(entry.settings) <= fields, name


def test_presets_are_reachable_by_name_from_anywhere(tmp_path, monkeypatch):
    """Issue 16: `leanlm train tiny` after a pip install (the presets are package data); a path
    still works, and an unknown name lists the presets."""
    from leanlm.engine.config.load import presets

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert {"tiny", "frugal_7b", "lost_frugal_7b"} <= set(presets())
    assert load_config("tiny").model.d_model == load_config(str(presets()["tiny"])).model.d_model
    assert load_config("frugal_7b.yaml").model.d_model == 4096  # extends llama_7b.yaml beside it
    with pytest.raises(ConfigError, match=r"no config file or preset named 'tinyy'; presets: .*tiny"):
        load_config("tinyy")
    with pytest.raises(ConfigError, match="not found"):
        load_config("sub/tiny.yaml")


def test_loading_every_preset_imports_no_torch():
    """The config package is a leaf: importing it and loading every preset (what ``leanlm keys``,
    ``leanlm memory --help`` and resume checks pay for) never imports torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from leanlm.engine.config import load_config\n"
        "from leanlm.engine.config.load import presets\n"
        "for name in presets(): load_config(name)\n"
        "assert len(presets()) > 10\n"
        "light = ('leanlm.optim', 'leanlm.optim.registry', 'leanlm.optim.defaults')  # torch-free\n"
        "heavy = ('torch', 'torch.', 'leanlm.optim', 'leanlm.kernels')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy) and m not in light))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv", [["keys"], ["memory", "--help"], ["--help"]])
def test_cli_commands_that_need_no_model_import_no_torch(argv):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from leanlm.engine.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "False"
