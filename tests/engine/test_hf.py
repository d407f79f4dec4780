"""Hugging Face in and out: export to a LlamaForCausalLM folder, import for continued pretraining,
tokenizer.json, GQA + tied embeddings + Llama 3 RoPE, checked against transformers itself."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from leanlm.engine.config import load_config
from leanlm.engine.data.tokenizer import Tokenizer
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.hf import export_hf
from leanlm.engine.hf import mapping as hf_mapping
from leanlm.engine.hf.files import iter_tensors
from leanlm.engine.hf.init import build_initialised, resolve
from leanlm.engine.hf.tokenizer_files import PARITY_SAMPLES
from leanlm.engine.hf.weights import to_hf
from leanlm.engine.trained import load_trained
from leanlm.engine.trainer import train

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402


def _trained(tiny_base, root: Path, name: str, extra: list[str]) -> Path:
    """A short run with a high lr: weights far from their init, where a wrong layout fails loudly."""
    over = [*tiny_base, "train.seq_len=64", "train.steps=24", "optim.lr=1e-2", "checkpoint.every=0"]
    train(load_config(None, [*over, *extra, f"train.out_dir={root / name}"]))
    return root / name


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_runs")
    gqa_tied = ["model.n_heads=4", "model.n_kv_heads=2", "model.tie_embeddings=true"]
    llama3 = ["model.rope_scaling=llama3", "model.rope_scaling_factor=8", "model.rope_original_max_len=16"]
    return {
        "gqa_tied": _trained(tiny_base, root, "gqa_tied", gqa_tied),
        "untied_llama3": _trained(tiny_base, root, "untied_llama3", llama3),
    }


def _logits_ours(run: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_trained(run, device="cpu").model.float()(tokens)


@pytest.mark.parametrize("name", ["gqa_tied", "untied_llama3"])
def test_export_loads_in_transformers_with_the_same_logits(runs, tmp_path, name):
    report = export_hf(runs[name], tmp_path / "hf")
    assert report.kind == "llama" and report.max_logit_diff is not None and report.max_logit_diff < 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = _logits_ours(runs[name], tokens)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert ours.std() > 0.5  # trained weights: logits far from uniform


def test_a_wrong_rope_layout_fails_the_export_validation(runs, tmp_path, monkeypatch):
    """The negative control: without the q/k row permutation the written folder computes another
    function, and the export's own check refuses it (nothing is left behind)."""
    monkeypatch.setattr("leanlm.engine.hf.weights.rotary_axis", lambda name: None)
    with pytest.raises(CheckpointError, match="logits differ"):
        export_hf(runs["gqa_tied"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.tmp-*"))


def test_config_json_carries_every_field_in_both_transformers_spellings(runs, tmp_path):
    export_hf(runs["untied_llama3"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_parameters"]["rope_type"] == "llama3"
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["max_position_embeddings"] == 64 and config["rms_norm_eps"] == 1e-6
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (1, 2, False)
    loaded = LlamaConfig.from_pretrained(tmp_path / "hf")  # HF configs accept unknown keys: read them back
    assert (loaded.num_key_value_heads, loaded.head_dim, loaded.vocab_size) == (2, 32, 512)


def test_tokenizer_gives_the_same_ids_in_transformers(runs, tmp_path):
    export_hf(runs["gqa_tied"], tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.load(runs["gqa_tied"])
    held_out = [
        p.read_text(errors="replace")[:3000] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("a*.py"))
    ]
    for text in [*PARITY_SAMPLES, *held_out]:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True), text[:40]
        assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.model_max_length) == (1, 2, 64)


def test_greedy_generation_matches_leanlm_generate(runs, tmp_path):
    from leanlm.engine.generate import sample

    export_hf(runs["gqa_tied"], tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    trained = load_trained(runs["gqa_tied"], device="cpu")
    prompt = "def main(argv):\n    "
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = sample(trained.model.float(), trained.tokenizer, prompt, max_new_tokens=32, temperature=0)
    assert tok.decode(out[0, 1:]) == ours
    assert out.shape[1] == ids.shape[1] + 32


def test_bf16_run_exports_bf16_sharded_and_loads(tiny_base, tmp_path):
    run = _trained(tiny_base, tmp_path, "bf16", ["train.param_dtype=bf16", "train.steps=3"])
    report = export_hf(run, tmp_path / "hf", max_shard_bytes=40_000)
    assert report.dtype == "bfloat16" and report.max_logit_diff is not None
    shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert all(t.dtype == torch.bfloat16 for _, t in iter_tensors(tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    report = export_hf(run, tmp_path / "hf32", dtype="fp32")
    assert report.dtype == "float32"


@pytest.mark.parametrize("phi,kind", [("identity", "llama"), ("silu", "lost")])
def test_lost_runs_export_folded_or_with_their_options(tiny_base, tmp_path, phi, kind):
    lost = ["model.lost.enabled=true", "model.lost.rank=8", f"model.lost.phi={phi}", "train.steps=3"]
    report = export_hf(_trained(tiny_base, tmp_path, "lost", lost), tmp_path / "hf")
    assert report.kind == kind and report.max_logit_diff is not None and report.max_logit_diff < 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert ("leanlm_lost" in config) == (kind == "lost")
    assert report.folded == (14 if kind == "llama" else 0)
    assert ("LOST layers folded" in report.summary()) == (kind == "llama")


def test_export_cli_and_python_api(runs, tmp_path, capsys):
    import leanlm.engine
    from leanlm.engine.cli import main

    assert leanlm.engine.export_hf is export_hf
    assert main(["export", str(runs["gqa_tied"]), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert "a plain LlamaForCausalLM" in capsys.readouterr().out
    assert main(["export", str(runs["gqa_tied"]), str(tmp_path / "hf")]) == 2  # not empty
    assert "not an empty folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------- import


def _tokenizer_json(folder: Path, vocab: int = 300) -> None:
    """A byte-level BPE tokenizer.json (SmolLM-style: no sentencepiece model), trained offline."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("b*.py"))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    backend.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}  # SmolLM2: bos = eos = 0
    (folder / "tokenizer_config.json").write_text(json.dumps(special))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A transformers-made Llama folder: GQA, tied, Llama 3 RoPE, eps 1e-5, weights scaled up."""
    folder = tmp_path_factory.mktemp("hf_model")
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8)  # attention far from uniform: a layout error moves logits by whole units
    model.save_pretrained(folder)
    _tokenizer_json(folder)
    return folder


def _import_cfg(tiny_base, tmp_path, folder, extra=()):
    over = [*tiny_base, f"train.init_from={folder}", "train.seq_len=64", f"train.out_dir={tmp_path / 'run'}"]
    return load_config(None, [*[o for o in over if not o.startswith("model.")], *extra])


def test_import_matches_transformers_logits_and_round_trips_bitwise(tiny_base, tmp_path, hf_folder):
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, hf_folder))
    assert (cfg.model.n_kv_heads, cfg.model.tie_embeddings, cfg.model.rope_scaling, cfg.model.norm_eps) == (
        2,
        True,
        "llama3",
        1e-5,
    )
    tok = Tokenizer.load(source.tokenizer)
    assert tok.kind == "tokenizers" and tok.bos_id == tok.eos_id == 0
    model = build_initialised(cfg, source, tok.vocab_size, torch.device("cpu"))
    theirs = LlamaForCausalLM.from_pretrained(hf_folder).float().eval()
    tokens = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(tokens).logits - model(tokens)).abs().max().item()
        wrong = theirs(tokens).logits.std().item()
    assert diff < 1e-4 and wrong > 1.0
    # zero steps: our tensors mapped back equal the folder's, bit for bit
    original = dict(iter_tensors(hf_folder))
    exported = dict(to_hf(n, t, cfg.model) for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_continued_pretraining_composes_with_frugal_step_in_backward_and_bf16(tiny_base, tmp_path, hf_folder):
    extra = [
        "optim.name=frugal",
        "optim.step_in_backward=true",
        "train.param_dtype=bf16",
        "train.batch_size=2",
        "train.micro_batch_size=2",
        "train.steps=3",
    ]
    res = train(_import_cfg(tiny_base, tmp_path, hf_folder, extra))
    assert res.step == 3 and (res.run_dir / "tokenizer.json").is_file()
    saved = load_config(res.run_dir / "config.yaml", [])
    assert (saved.model.d_model, saved.model.vocab_size, saved.train.init_from) == (64, 320, str(hf_folder))
    trained = load_trained(res.run_dir, device="cpu")
    assert trained.model.lm_head.weight is trained.model.embed_tokens.weight  # one tied tensor
    assert trained.tokenizer.kind == "tokenizers"
    # and out again: the imported tokenizer.json travels with it, ids unchanged
    report = export_hf(res.run_dir, tmp_path / "out")
    assert report.dtype == "bfloat16" and report.max_logit_diff is not None and report.max_logit_diff < 1e-4
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def f(x):\n\treturn  x  # naïve 🙂"
    assert theirs(text, add_special_tokens=False)["input_ids"] == trained.tokenizer.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (0, 0)


def test_import_into_lost_converts_the_pretrained_weights(tiny_base, tmp_path, hf_folder):
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, hf_folder, ["model.lost.enabled=true", "model.lost.rank=8"]))
    model = build_initialised(cfg, source, 300, torch.device("cpu"))
    from leanlm.optim.lost import LOSTLinear

    assert sum(isinstance(m, LOSTLinear) for m in model.modules()) == 14


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"attention_bias": True}, "attention_bias=True is not supported"),
        ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type='qwen2' is not supported"),
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "rope_parameters": None}, "'yarn' is not supported"),
        ({"head_dim": 32}, "head_dim=32"),
        ({"max_position_embeddings": 32}, "train.seq_len=64 is longer"),
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_folders_are_refused_in_one_line(tiny_base, tmp_path, hf_folder, changes, message):
    folder = _copy_folder(hf_folder, tmp_path / "m")
    _edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        resolve(_import_cfg(tiny_base, tmp_path, folder))


def test_bad_import_inputs_name_the_fix(tiny_base, tmp_path, hf_folder):
    with pytest.raises(ConfigError, match="model.d_model=128 but train.init_from"):
        resolve(_import_cfg(tiny_base, tmp_path, hf_folder, ["model.d_model=128"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a run folder"):
        resolve(_import_cfg(tiny_base, tmp_path, empty))
    with pytest.raises(ConfigError, match="no such folder"):
        resolve(_import_cfg(tiny_base, tmp_path, tmp_path / "missing folder"))
    # a truncated weights file
    cut = _copy_folder(hf_folder, tmp_path / "cut")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, cut))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        build_initialised(cfg, source, 300, torch.device("cpu"))
    # pickle weights are never loaded
    pickled = _copy_folder(hf_folder, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, pickled))
    with pytest.raises(CheckpointError, match="pickle files are not loaded"):
        build_initialised(cfg, source, 300, torch.device("cpu"))


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_base, tmp_path, hf_folder):
    big = _copy_folder(hf_folder, tmp_path / "big")
    _tokenizer_json(big, vocab=400)  # 400 pieces for a 320-row embedding
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 400"):
        train(_import_cfg(tiny_base, tmp_path, big))


def test_mapping_table_is_one_table_both_directions():
    for ours in ("embed_tokens.weight", "layers.3.self_attn.k_proj.weight", "norm.weight", "lm_head.weight"):
        assert hf_mapping.our_name(hf_mapping.hf_name(ours)) == ours
    assert hf_mapping.our_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


# ----------------------------------------------------------------------------- lm-evaluation-harness

HARNESS = Path(__file__).resolve().parents[1] / "data" / "harness"


@pytest.fixture
def offline_tasks(monkeypatch, tmp_path):
    """lm_eval on the shipped local tasks: data_files resolve against this folder; caches in tmp."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(HARNESS)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_harness_scores_equal_lm_evals_own_hf_model_on_the_exported_folder(runs, tmp_path, offline_tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from leanlm.engine.harness import run_harness

    trained = load_trained(runs["gqa_tied"], device="cpu")
    ours = run_harness(trained.model, trained.cfg, trained.tokenizer, ["leanlm_mc", "leanlm_ppl"], include_path=".")
    export_hf(runs["gqa_tied"], tmp_path / "hf")
    manager = TaskManager(include_path=".", include_defaults=False)
    args = f"pretrained={tmp_path / 'hf'},dtype=float32,device=cpu"
    mc = simple_evaluate(model="hf", model_args=f"{args},add_bos_token=True", tasks=["leanlm_mc"], task_manager=manager)
    # rolling loglikelihood: lm_eval conditions on BOS itself, so the tokenizer must not add one (#3333)
    ppl = simple_evaluate(
        model="hf", model_args=f"{args},add_bos_token=False", tasks=["leanlm_ppl"], task_manager=manager
    )
    for theirs, task, metrics in ((mc, "leanlm_mc", ("acc", "acc_norm")), (ppl, "leanlm_ppl", ("bits_per_byte",))):
        for metric in metrics:
            assert ours.results[task][f"{metric},none"] == pytest.approx(
                theirs["results"][task][f"{metric},none"], 1e-6
            )


def test_harness_loglikelihood_equals_the_engines_own_loss(runs, offline_tasks):
    """Rolling loglikelihood of each document = minus leanlm's summed token loss on [BOS] + ids:
    BOS is conditioned on once and never scored."""
    import math

    from leanlm.engine.harness import run_harness

    trained = load_trained(runs["gqa_tied"], device="cpu")
    docs = [json.loads(line)["text"] for line in (HARNESS / "leanlm_ppl.jsonl").read_text().splitlines()]
    result = run_harness(trained.model, trained.cfg, trained.tokenizer, ["leanlm_ppl"], include_path=".")
    total = 0.0
    for text in docs:
        ids = trained.tokenizer.encode(text, bos=True)
        x = torch.tensor([ids])
        with torch.no_grad():
            loss = trained.model.float()(x[:, :-1], targets=x[:, 1:])[0].item()
        total += loss * (len(ids) - 1)
    n_bytes = sum(len(t.encode()) for t in docs)
    bpb = result.results["leanlm_ppl"]["bits_per_byte,none"]
    assert bpb == pytest.approx(total / n_bytes / math.log(2), rel=1e-5)


def test_leanlm_eval_tasks_writes_results_into_the_run(runs, offline_tasks, capsys):
    from leanlm.engine.cli import main

    run = runs["untied_llama3"]
    assert main(["eval", str(run), "--tasks", "leanlm_mc", "--include-path", ".", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "leanlm_mc" in out and "acc_norm" in out
    saved = json.loads(next((run / "eval").glob("harness-step-*.json")).read_text())
    assert saved["step"] == 24 and saved["results"]["leanlm_mc"]["sample_len"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("harness/leanlm_mc/acc" in r and r["step"] == 24 for r in rows)


def test_harness_during_training_leaves_the_run_unchanged(tiny_base, tmp_path, offline_tasks):
    base = [*tiny_base, "train.steps=4", "eval.every=2", "checkpoint.every=2"]
    plain = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'plain'}"]))
    harness = [
        "eval.harness_tasks=[leanlm_mc]",
        "eval.harness_every=2",
        "eval.harness_include_path=.",
        "eval.harness_limit=2",
    ]
    with_harness = train(load_config(None, [*base, *harness, f"train.out_dir={tmp_path / 'h'}"]))
    assert with_harness.losses == plain.losses and with_harness.final.loss == plain.final.loss
    assert sorted(p.name for p in (tmp_path / "h" / "eval").iterdir()) == [
        "harness-step-00000002.json",
        "harness-step-00000004.json",
    ]


def test_a_missing_lm_eval_is_one_line_naming_the_extra(runs, monkeypatch):
    import sys

    from leanlm.engine.harness import run_harness

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    trained = load_trained(runs["gqa_tied"], device="cpu")
    with pytest.raises(ConfigError, match=r"pip install 'leanlm\[eval\]'"):
        run_harness(trained.model, trained.cfg, trained.tokenizer, ["leanlm_mc"])


@pytest.mark.parametrize("preset", ["smollm_135m", "llama3_1b"])
def test_modern_presets_count_what_transformers_counts(preset):
    from leanlm.engine.hf.mapping import Special, hf_config
    from leanlm.engine.model import LLaMA, count_parameters

    root = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(root / f"{preset}.yaml", [])
    vocab = cfg.model.vocab_size
    with torch.device("meta"):
        ours = count_parameters(LLaMA(cfg.model, vocab, cfg.train.seq_len))
        config = hf_config(
            cfg.model, vocab_size=vocab, seq_len=cfg.train.seq_len, dtype="float32", special=Special(1, 2)
        )
        theirs = LlamaForCausalLM(LlamaConfig(**config)).num_parameters()
    assert ours == theirs == {"smollm_135m": 134_515_008, "llama3_1b": 1_235_814_400}[preset]


def test_a_full_disk_during_export_leaves_nothing(runs, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("leanlm.engine.hf.export.write_tensors", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        export_hf(runs["gqa_tied"], tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_folders_missing_their_config_or_weights_are_named(tiny_base, tmp_path, hf_folder):
    no_config = _copy_folder(hf_folder, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve(_import_cfg(tiny_base, tmp_path, no_config))
    no_weights = _copy_folder(hf_folder, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, no_weights))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        build_initialised(cfg, source, 300, torch.device("cpu"))


def test_mistral_without_a_sliding_window_is_the_same_model(tiny_base, tmp_path, hf_folder):
    folder = _copy_folder(hf_folder, tmp_path / "mistral")
    _edit_config(folder, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    cfg, source = resolve(_import_cfg(tiny_base, tmp_path, folder))
    model = build_initialised(cfg, source, 300, torch.device("cpu"))
    tokens = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(folder).float().eval()
    assert type(theirs).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        assert (theirs(tokens).logits - model(tokens)).abs().max().item() < 1e-4


def test_data_tokenizer_takes_a_tokenizer_json(runs, tiny_base, tmp_path):
    """A tokenizer.json (here the export of a leanlm sentencepiece model) trains a run, whose
    checkpoints keep it; its ids are sentencepiece's."""
    export_hf(runs["gqa_tied"], tmp_path / "hf")
    over = [*tiny_base, f"data.tokenizer={tmp_path / 'hf' / 'tokenizer.json'}", f"train.out_dir={tmp_path / 'run'}"]
    res = train(load_config(None, [*over, "train.steps=2"]))
    tok = Tokenizer.load(res.checkpoint)
    spm = Tokenizer.load(runs["gqa_tied"])
    assert tok.kind == "tokenizers" and (res.checkpoint / "tokenizer.json").is_file()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (spm.bos_id, spm.eos_id, spm.vocab_size)
    text = "def f(x):\n\treturn  x  # naïve 🙂"
    assert tok.encode(text) == spm.encode(text) and tok.decode(tok.encode(text)) == text


def test_a_hub_id_without_a_network_is_one_line(tiny_base, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ConfigError, match="not a local folder, and the Hub download failed"):
        resolve(_import_cfg(tiny_base, tmp_path, "HuggingFaceTB/SmolLM2-135M"))
