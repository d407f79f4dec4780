"""Import and export at a 1B shape on this machine: time and peak resident memory.

1. writes a Llama-3.2-1B-shaped Hugging Face folder (configs/llama3_1b.yaml: GQA, tied, Llama 3
   RoPE, vocabulary 128256; bf16 safetensors, random weights; a tokenizer.json exported from a
   leanlm-trained sentencepiece model);
2. imports it: ``leanlm train configs/llama3_1b.yaml train.init_from=FOLDER`` for one step (bf16
   weights, FRUGAL, step in backward, one 256-token row), in a child process whose peak RSS is
   compared with ``leanlm memory`` for the same run (``--cpu``);
3. times the import alone (``resolve`` + ``build_initialised``) in another child;
4. exports the run's checkpoint with ``leanlm export`` (bf16), in a child; peak RSS and time.

    .venv/bin/python scripts/hf_bench.py [--work /tmp/hf_bench] [--preset llama3_1b | frugal_7b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "configs" / "llama3_1b.yaml")  # --preset changes it
RUN = [
    "train.steps=1",
    "train.batch_size=1",
    "train.micro_batch_size=1",
    "train.seq_len=256",
    "train.threads=2",
    "optim.name=frugal",
    "optim.step_in_backward=true",
    "train.param_dtype=bf16",
    "eval.every=0",
    "eval.tokens=512",
    "eval.batch_size=1",
    "log.progress=false",
    "log.tensorboard=false",
]


# Each child reports its own peak RSS at exit (RUSAGE_CHILDREN would give the max over all children).
PEAK = (
    "import atexit, resource\n"
    "atexit.register(lambda: print(f'PEAK_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}'))"
)


def child(code: str, argv: list[str] | None = None) -> tuple[float, float, str]:
    """Run Python ``code`` (or the leanlm CLI with ``argv``) in a child: (seconds, its peak RSS in GiB, output)."""
    if argv is not None:
        code = f"import sys; sys.argv = ['leanlm', *{argv!r}]\nfrom leanlm.engine.cli import run\nrun()"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", f"{PEAK}\n{code}"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    peaks = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_KIB")]
    text = "\n".join(line for line in (out.stdout + out.stderr).splitlines() if not line.startswith("PEAK_KIB"))
    return seconds, peaks[-1] / 2**20, text


def make_folder(folder: Path, tokenizer_json: Path) -> None:
    """A Hugging Face folder of the preset's shape (vocabulary 32000 where the preset leaves it to
    the tokenizer), written tensor by tensor."""
    code = f"""
import torch, json
from pathlib import Path
from leanlm.engine.config import load_config
from leanlm.engine.model import LLaMA
from leanlm.engine.hf.mapping import Special, hf_config
from leanlm.engine.hf.files import write_tensors, write_json
from leanlm.engine.hf.weights import exported_tensors, to_hf
cfg = load_config({PRESET!r}, [])
vocab = cfg.model.vocab_size or 32000
folder = Path({str(folder)!r})
with torch.device("meta"):
    model = LLaMA(cfg.model, vocab, 8192)
gen = torch.Generator().manual_seed(0)
def tensors():
    for name in exported_tensors(model, cfg.model):
        shape = dict(model.state_dict(keep_vars=True))[name].shape
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        yield to_hf(name, t.to(torch.bfloat16), cfg.model)
write_tensors(folder, tensors())
write_json(folder / "config.json", hf_config(cfg.model, vocab_size=vocab, seq_len=8192,
           dtype="bfloat16", special=Special(1, 2)))
"""
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/hf_bench")
    ap.add_argument("--preset", default="llama3_1b", help="configs/NAME.yaml, e.g. frugal_7b (~45 GB of disk)")
    args = ap.parse_args()
    global PRESET
    PRESET = str(ROOT / "configs" / f"{args.preset}.yaml")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    leanlm = str(Path(sys.executable).with_name("leanlm"))
    env_note = f"{os.cpu_count()} CPUs"

    # a tokenizer.json: a tiny leanlm run's own (sentencepiece, exported)
    tiny = work / "tiny"
    subprocess.run(
        [leanlm, "train", "tiny", "train.steps=1", f"train.out_dir={tiny}", "eval.every=0", "log.progress=false"],
        check=True,
        capture_output=True,
    )
    subprocess.run([leanlm, "export", str(tiny), str(work / "tiny_hf")], check=True, capture_output=True)
    folder = work / f"{args.preset}_hf"
    t0 = time.perf_counter()
    make_folder(folder, work / "tiny_hf" / "tokenizer.json")
    size = sum(f.stat().st_size for f in folder.iterdir()) / 2**30
    print(f"folder: {folder} ({size:.2f} GiB, written in {time.perf_counter() - t0:.0f}s)")

    over = [*RUN, f"train.init_from={folder}", f"train.out_dir={work / 'run'}"]
    _, _, est = child("", ["memory", PRESET, *over, "--cpu"])
    print("leanlm memory --cpu for the run:\n" + est)

    code = f"""
import time, resource, torch
from leanlm.engine.config import load_config
from leanlm.engine.hf.init import resolve, build_initialised
from leanlm.engine.data.tokenizer import Tokenizer
t = time.perf_counter()
cfg, src = resolve(load_config({PRESET!r}, {over!r}))
model = build_initialised(cfg, src, Tokenizer.load(src.tokenizer).vocab_size, torch.device("cpu"))
print(f"import: {{time.perf_counter() - t:.1f}}s, {{sum(p.numel() for p in model.parameters()) / 1e9:.3f}}B params, "
      f"dtype {{model.embed_tokens.weight.dtype}}")
"""
    seconds, peak, out = child(code)
    print(out.strip() + f"; child peak RSS {peak:.2f} GiB ({seconds:.1f}s with Python start)")

    seconds, peak, out = child("", ["train", PRESET, *over])
    print(f"train 1 step from the import: {seconds:.0f}s, peak RSS {peak:.2f} GiB")
    print("\n".join(line for line in out.splitlines() if "leanlm:" in line)[-1500:])

    seconds, peak, out = child("", ["export", str(work / "run"), str(work / "export")])
    print(f"export: {seconds:.1f}s, peak RSS {peak:.2f} GiB ({env_note})\n{out.strip().splitlines()[-1]}")
    shutil.rmtree(work, ignore_errors=True)  # tens of GB at 7B


if __name__ == "__main__":
    main()
