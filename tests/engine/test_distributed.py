"""Multi-process training under torchrun on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO against one
process, exact resume (also FSDP2 saved on 2 ranks, resumed on 1), elastic restart after a killed
worker, and a two-node launch on loopback. Each launch costs a few seconds: marked slow."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from leanlm.engine.config import load_config
from leanlm.engine.distributed import resolve_backend
from leanlm.engine.errors import CheckpointError, ConfigError
from leanlm.engine.trainer import train

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
HAS_DS = importlib.util.find_spec("deepspeed") is not None
needs_ds = pytest.mark.skipif(not HAS_DS, reason="needs deepspeed")

BACKENDS = {  # name -> overrides
    "ddp": ["distributed.backend=ddp"],
    "fsdp2": ["distributed.backend=fsdp2"],
    "ds0": ["distributed.backend=deepspeed", "distributed.zero_stage=0"],
    "ds1": ["distributed.backend=deepspeed", "distributed.zero_stage=1"],
    "ds2": ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
    "ds3": ["distributed.backend=deepspeed", "distributed.zero_stage=3"],
}
# Gradient accumulation: 2 micro-batches of 1 row per rank (no_sync / FSDP2's deferred reduce /
# DeepSpeed's accumulation boundary).
# The optimizer step inside backward under FSDP2 (each shard stepped once reduce-scattered),
# against the plain FSDP2 step without clipping (per-tensor clipping differs from global clipping).
BACKENDS["fsdp2-noclip"] = [*BACKENDS["fsdp2"], "train.grad_clip=0"]
BACKENDS["fsdp2-sib"] = [*BACKENDS["fsdp2-noclip"], "optim.step_in_backward=true"]
BACKENDS["fsdp2-sib-clip"] = [*BACKENDS["fsdp2"], "optim.step_in_backward=true", "train.grad_clip=0.05"]
SINGLE = {"single": [], "single-sib-clip": ["optim.step_in_backward=true", "train.grad_clip=0.05"]}
for _name in ("ddp", "fsdp2", "ds2", "fsdp2-noclip", "fsdp2-sib"):
    BACKENDS[f"{_name}-accum"] = [*BACKENDS[_name], "train.micro_batch_size=1"]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        # gloo workers restarted by the elastic agent must not reuse the agent's TCP store.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def val_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in rows if "val/loss" in r]


def steps_logged(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


class Runs:
    """Runs launched once per module and shared by the tests that compare against them."""

    def __init__(self, base: list[str], root: Path) -> None:
        self.base, self.root, self.done = base, root, {}

    def overrides(self, optim: str, out: Path, extra=()) -> list[str]:
        return [*self.base, f"optim.name={optim}", f"train.out_dir={out}", *extra]

    def launch(self, optim, out, extra=(), nproc=2, launcher=(), extra_env=None, resume=False):
        over = self.overrides(optim, out, [*extra, *(["train.resume=auto"] if resume else [])])
        cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"])]
        cmd += [f"--nproc-per-node={nproc}", "-m", "leanlm.engine.cli", "train", TINY, *over]
        out_p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**env(), **(extra_env or {})})
        assert out_p.returncode == 0, out_p.stdout[-2000:] + out_p.stderr[-4000:]
        return out

    def get(self, backend: str, optim: str) -> Path:
        key = (backend, optim)
        if key not in self.done:
            out = self.root / f"{backend}-{optim}"
            if backend in SINGLE:
                train(load_config(TINY, self.overrides(optim, out, SINGLE[backend])))
            else:
                self.launch(optim, out, BACKENDS[backend])
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory) -> Runs:
    # One thread per rank; a refresh inside the 6 steps; 17 held-out windows (split 9 / 8).
    extra = ["train.threads=1", "optim.update_gap=2", "eval.tokens=544"]
    base = [*tiny_base, *extra]
    return Runs(base, tmp_path_factory.mktemp("dist"))


CASES = [
    ("ddp-accum", "frugal"),
    ("fsdp2-accum", "frugal"),
    pytest.param("ds2-accum", "frugal", marks=needs_ds),
    ("ddp", "adamw"),
    ("ddp", "frugal"),
    ("fsdp2", "adamw"),
    ("fsdp2", "frugal"),
    pytest.param("ds0", "frugal", marks=needs_ds),
    pytest.param("ds1", "adamw", marks=needs_ds),
    pytest.param("ds1", "frugal", marks=needs_ds),
    pytest.param("ds2", "adamw", marks=needs_ds),
    pytest.param("ds2", "frugal", marks=needs_ds),
    pytest.param("ds3", "adamw", marks=needs_ds),
    pytest.param("ds3", "frugal", marks=needs_ds),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend,optim", CASES)
def test_two_ranks_match_one_process(runs, backend, optim):
    """Same global batch (2 x 2 rows vs 4 rows), 6 steps across a FRUGAL refresh: same losses."""
    single = losses(runs.get("single", optim))
    multi = losses(runs.get(backend, optim))
    assert len(multi) == len(single) == 6
    assert multi == pytest.approx(single, rel=1e-5, abs=1e-6)
    # Held-out loss too: 17 windows split 9 / 8 over the ranks (one rank runs a dummy forward).
    assert val_losses(runs.get(backend, optim)) == pytest.approx(val_losses(runs.get("single", optim)), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optim,accum", [("adamw", ""), ("frugal", ""), ("frugal", "-accum")])
def test_fsdp2_step_in_backward_equals_the_plain_fsdp2_step(runs, optim, accum):
    """Each rank steps its shards inside backward, as FSDP2 reduce-scatters them: the same losses,
    bit for bit, as FSDP2's plain step (no clipping; FRUGAL across a subspace refresh; with
    accumulation the reduce-scatter, and so the step, waits for the last micro-batch)."""
    plain = losses(runs.get(f"fsdp2-noclip{accum}", optim))
    assert len(plain) == 6
    assert losses(runs.get(f"fsdp2-sib{accum}", optim)) == plain


@pytest.mark.slow
def test_fsdp2_step_in_backward_clips_each_whole_tensor(runs):
    """Per-tensor clipping under FSDP2 caps each tensor's whole norm (all-reduced from its shards):
    the same run as one process clipping per tensor (a clip small enough to bind on every tensor)."""
    single = losses(runs.get("single-sib-clip", "frugal"))
    assert losses(runs.get("fsdp2-sib-clip", "frugal")) == pytest.approx(single, rel=1e-5, abs=1e-6)
    assert single != losses(runs.get("fsdp2-sib", "frugal"))  # the clip did bind


def _resume_copy(src: Path, dst: Path) -> Path:
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step-00000003", dst / "checkpoints" / "step-00000003")
    return dst


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,optim,nproc",
    [
        ("ddp", "frugal", 2),
        ("fsdp2", "frugal", 2),
        ("fsdp2", "frugal", 1),  # saved on 2 ranks, resumed on 1 (torchrun, FSDP2 on one rank)
        ("fsdp2", "adamw", 0),  # saved on 2 ranks, resumed in a plain process (no torchrun)
        pytest.param("ds2", "frugal", 2, marks=needs_ds),
        pytest.param("ds3", "adamw", 2, marks=needs_ds),
        pytest.param("ds3", "frugal", 2, marks=needs_ds),
    ],
)
def test_resume_continues_the_loss_sequence_exactly(runs, tmp_path, backend, optim, nproc):
    full = losses(runs.get(backend, optim))
    out = _resume_copy(runs.get(backend, optim), tmp_path / "resumed")
    if nproc == 0:
        train(load_config(TINY, runs.overrides(optim, out, ["train.resume=auto"])))
    else:
        runs.launch(optim, out, BACKENDS[backend], nproc=nproc, resume=True)
    assert losses(out) == pytest.approx(full[3:], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_killed_worker_restarts_and_finishes_like_an_uninterrupted_run(runs, tmp_path):
    full = losses(runs.get("fsdp2", "frugal"))
    out = tmp_path / "elastic"
    runs.launch(
        "frugal",
        out,
        BACKENDS["fsdp2"],
        launcher=["--standalone", "--max-restarts=1"],
        extra_env={"LEANLM_FAULT_AT": "4:1"},
        resume=True,
    )
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # step 4 of the killed attempt was dropped
    assert losses(out) == pytest.approx(full, rel=1e-5, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_node_launch_on_loopback_agrees_with_one_node(runs, tmp_path):
    full = losses(runs.get("fsdp2", "frugal"))
    out = tmp_path / "two-node"
    port = _free_port()
    launcher = [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=leanlm-test",
    ]
    over = runs.overrides("frugal", out, BACKENDS["fsdp2"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node=1"]
    cmd += ["-m", "leanlm.engine.cli", "train", TINY, *over]
    nodes = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env()) for _ in range(2)
    ]
    for node in nodes:
        text, _ = node.communicate(timeout=400)
        assert node.returncode == 0, text[-3000:]
    assert losses(out) == pytest.approx(full, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------- fast checks


def test_sharded_backends_need_torchrun(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "RANK", "MASTER_ADDR", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        resolve_backend("fsdp2")
    assert resolve_backend("auto") == "none"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["distributed.zero_stage=2"], "needs distributed.backend=deepspeed"),
        (["distributed.backend=deepspeed", "distributed.zero_stage=3", "optim.name=badam"], "no flat form"),
        (["distributed.backend=deepspeed", "distributed.zero_stage=1", "optim.name=galore"], "no flat form"),
        (
            ["distributed.backend=deepspeed", "distributed.zero_stage=2", "optim.name=frugal", "optim.projection=rows"],
            "no flat form",
        ),
        (["distributed.backend=deepspeed", "distributed.zero_stage=2", "optim.name=apollo"], "needs whole matrices"),
        (
            ["distributed.backend=deepspeed", "distributed.zero_stage=1", "optim.name=frugal", "optim.state_free=fira"],
            "needs whole matrices",
        ),
        (["distributed.backend=fsdpp"], "did you mean 'fsdp2'"),
    ],
)
def test_impossible_backend_combinations_are_rejected_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, overrides)


def test_allowed_combinations_validate():
    for over in (
        ["distributed.backend=deepspeed", "distributed.zero_stage=2", "optim.name=frugal"],
        ["distributed.backend=deepspeed", "distributed.zero_stage=3", "optim.name=adamw"],
        ["distributed.backend=deepspeed", "distributed.zero_stage=3", "optim.name=frugal"],
        ["distributed.backend=deepspeed", "distributed.zero_stage=0", "optim.name=galore"],
        ["distributed.backend=fsdp2", "optim.name=galore"],
    ):
        load_config(TINY, over)


@pytest.mark.slow
@needs_ds
def test_deepspeed_checkpoint_refuses_another_backend(runs, tmp_path):
    out = _resume_copy(runs.get("ds2", "frugal"), tmp_path / "other")
    with pytest.raises(CheckpointError, match="resume it with that backend"):
        train(load_config(TINY, runs.overrides("frugal", out, ["train.resume=auto"])))


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,optim",
    [
        ("fsdp2", "frugal"),
        pytest.param("ds0", "frugal", marks=needs_ds),
        pytest.param("ds1", "adamw", marks=needs_ds),
        pytest.param("ds2", "adamw", marks=needs_ds),
        pytest.param("ds3", "adamw", marks=needs_ds),
    ],
)
def test_sharded_checkpoints_export_on_one_process(runs, tmp_path, backend, optim):
    """FSDP2's dcp/ and DeepSpeed ZeRO 0-3 checkpoints export without torchrun; the folder equals
    the weights the engine loads from them, and (when transformers is there) computes the same."""
    import torch

    from leanlm.engine.hf import export_hf
    from leanlm.engine.hf.files import iter_tensors
    from leanlm.engine.hf.weights import from_hf
    from leanlm.engine.trained import load_trained

    run = runs.get(backend, optim)
    report = export_hf(run, tmp_path / "hf")
    assert report.kind == "llama" and report.checkpoint.parent.parent == run
    weights = load_trained(run, device="cpu").model.state_dict()
    mapped = dict(m for n, t in iter_tensors(tmp_path / "hf") if (m := from_hf(n, t, load_trained(run).cfg.model)))
    assert mapped.keys() == weights.keys() and all(torch.equal(mapped[k], weights[k]) for k in weights)
    if importlib.util.find_spec("transformers"):
        assert report.max_logit_diff is not None and report.max_logit_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", pytest.param("ds2", marks=needs_ds)])
def test_continued_pretraining_from_an_hf_folder_under_sharded_backends(runs, tmp_path, backend):
    """train.init_from under FSDP2 and ZeRO-2: the weights load before sharding / wrapping, so two
    ranks train on exactly what one process trains on."""
    from leanlm.engine.hf import export_hf

    folder = tmp_path / "hf"
    export_hf(runs.get("single", "adamw"), folder)
    extra = [f"train.init_from={folder}", "optim.warmup_steps=0"]
    single = tmp_path / "single"
    train(load_config(TINY, runs.overrides("adamw", single, extra)))
    multi = runs.launch("adamw", tmp_path / backend, [*BACKENDS[backend], *extra])
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    assert losses(single)[0] < 6.0  # starts from the trained weights, not from ln(512) = 6.24


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "ddp", pytest.param("ds2", marks=needs_ds)])
def test_tied_embeddings_are_one_tensor_under_every_backend(runs, tmp_path, backend):
    """model.tie_embeddings with FRUGAL: two ranks match one process (the tied tensor is sharded,
    reduced and stepped once), and the checkpoint's weights keep the two names on one tensor."""
    from leanlm.engine.trained import load_trained

    extra = ["model.tie_embeddings=true", "model.n_heads=4", "model.n_kv_heads=2"]
    single = tmp_path / "single"
    train(load_config(TINY, runs.overrides("frugal", single, extra)))
    multi = runs.launch("frugal", tmp_path / backend, [*BACKENDS[backend], *extra])
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)
    model = load_trained(multi, device="cpu").model
    assert model.lm_head.weight is model.embed_tokens.weight


@pytest.mark.slow
def test_document_masking_under_fsdp2_matches_one_process(runs, tmp_path):
    extra = ["model.doc_masking=true", "optim.name=frugal"]
    single = tmp_path / "single"
    train(load_config(TINY, runs.overrides("frugal", single, extra)))
    multi = runs.launch("frugal", tmp_path / "fsdp2", [*BACKENDS["fsdp2"], *extra])
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_a_mixture_of_shards_under_ddp_matches_one_process(runs, corpus_dir, tmp_path):
    """data.mix with two shard folders: two ranks read the same rows as one process (and gather
    the per-source training losses)."""
    from leanlm.engine.data.tokenize import tokenize_source

    files = sorted(corpus_dir.glob("*.py"))
    for name, part in (("a", files[::2]), ("b", files[1::2])):
        (tmp_path / f"text_{name}").mkdir()
        for f in part:
            shutil.copy(f, tmp_path / f"text_{name}" / f.name)
    tokenize_source(str(tmp_path / "text_a"), tmp_path / "a", vocab_size=512, val_fraction=0.15, unit_bytes=60_000)
    tokenize_source(str(tmp_path / "text_b"), tmp_path / "b", tokenizer=str(tmp_path / "a"), val_fraction=0.15)
    mix = (
        f"data.mix=[{{name: a, source: 'tokens:{tmp_path / 'a'}', weight: 3}}, "
        f"{{name: b, source: 'tokens:{tmp_path / 'b'}', weight: 1}}]"
    )
    base = [o for o in runs.base if not o.startswith(("data.source", "data.vocab_size"))]
    single = tmp_path / "single"
    train(load_config(TINY, [*base, "optim.name=adamw", f"train.out_dir={single}", mix]))
    cmd_runs = Runs(base, tmp_path)
    multi = cmd_runs.launch("adamw", tmp_path / "ddp", [*BACKENDS["ddp"], mix])
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5, abs=1e-6)

    def per_source(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r.get(f"train/{n}/loss", -1.0) for r in rows if "train/a/loss" in r for n in ("a", "b")]

    assert per_source(multi) == pytest.approx(per_source(single), rel=1e-5)


@pytest.mark.slow
def test_shards_resume_on_another_world_size(runs, corpus_dir, tmp_path):
    """data.source=tokens:DIR: stopped on one process at step 3, resumed on two DDP ranks (a
    backend that takes a one-process checkpoint): the loss sequence is the uninterrupted run's."""
    backend = "ddp"
    from leanlm.engine.data.tokenize import tokenize_source

    tokenize_source(str(corpus_dir), tmp_path / "shards", vocab_size=512, val_fraction=0.15, unit_bytes=60_000)
    base = [o for o in runs.base if not o.startswith(("data.source", "data.vocab_size"))]
    base.append(f"data.source=tokens:{tmp_path / 'shards'}")
    full = tmp_path / "full"
    train(load_config(TINY, [*base, "optim.name=adamw", f"train.out_dir={full}"]))
    part = tmp_path / "part"
    train(load_config(TINY, [*base, "optim.name=adamw", f"train.out_dir={part}"]), stop_at=3)
    Runs(base, tmp_path).launch("adamw", part, BACKENDS[backend], resume=True)
    assert losses(part)[3:] == pytest.approx(losses(full)[3:], rel=1e-5, abs=1e-6)
