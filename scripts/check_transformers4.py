"""Does an exported folder load the same in transformers 4.x as in 5.x? Two halves, two venvs:

    .venv/bin/python scripts/check_transformers4.py reference RUN OUT_DIR   # leanlm: export + reference
    /path/to/venv-with-transformers-4/bin/python scripts/check_transformers4.py check OUT_DIR

``reference`` exports RUN (fp32) to OUT_DIR/hf and writes leanlm's logits on fixed tokens and its
ids on fixed texts; ``check`` (no leanlm needed) loads the folder with AutoModelForCausalLM /
AutoTokenizer and compares.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TEXTS = [
    "def main(argv):\n\treturn  0\n",
    "    indented    with   runs of spaces\t\ttabs\n\n",
    "naïve café 日本語 🙂🚀 <s> literal",
    " leading space and trailing  ",
]


def reference(run: str, out: Path) -> None:
    from leanlm.engine.hf import export_hf
    from leanlm.engine.trained import load_trained

    report = export_hf(run, out / "hf", dtype="fp32")
    trained = load_trained(run, device="cpu")
    tokens = torch.randint(0, trained.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = trained.model.float()(tokens)
    torch.save({"tokens": tokens, "logits": logits}, out / "reference.pt")
    ids = [trained.tokenizer.encode(t, bos=True) for t in TEXTS]
    (out / "ids.json").write_text(json.dumps(ids))
    print(report.summary())


def check(out: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = torch.load(out / "reference.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (model(ref["tokens"]).logits - ref["logits"]).abs().max().item()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = json.loads((out / "ids.json").read_text())
    same = sum(tok(t)["input_ids"] == i for t, i in zip(TEXTS, ids))
    cfg = model.config
    print(
        f"transformers {transformers.__version__}: {type(model).__name__}, max |logit diff| {diff:.3g}; "
        f"tokenizer {type(tok).__name__}: {same}/{len(TEXTS)} texts with leanlm's ids; rope_theta "
        f"{cfg.rope_theta}, rope_scaling {cfg.rope_scaling}, kv heads {cfg.num_key_value_heads}, "
        f"tied {cfg.tie_word_embeddings}"
    )
    if diff > 1e-4 or same != len(TEXTS):
        raise SystemExit("mismatch")


if __name__ == "__main__":
    if sys.argv[1] == "reference":
        reference(sys.argv[2], Path(sys.argv[3]))
    else:
        check(Path(sys.argv[2]))
