#!/usr/bin/env bash
# Build leanlm's wheel and use it the way a user of `pip install leanlm` would: a fresh venv, no
# repository beside it, a preset by name. Run by .ci/run after the tests (`make wheel-check`).
#   scripts/check_wheel.sh [python] [torch spec]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
TORCH_SPEC="${2:-torch==2.13.0}"
WORK="$(mktemp -d /tmp/leanlm-wheel.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL="$(ls "$WORK"/dist/leanlm-*.whl)"
python3 - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["leanlm/configs/tiny.yaml", "leanlm/configs/frugal_7b.yaml", "leanlm/engine/cli.py", "leanlm/optim/frugal.py",
        "leanlm/kernels/lost_triton.py", "leanlm/optim/registry.py", "leanlm/engine/py.typed", "leanlm/optim/py.typed",
        "leanlm/kernels/py.typed", "leanlm/engine/hf/export.py", "leanlm/configs/llama3_1b.yaml"]
missing = [n for n in need if n not in names]
assert not missing, f"wheel lacks {missing}"
assert not any(n.startswith(("engine/", "optim/", "kernels/", "tests/")) for n in names), "top-level packages shipped"
print(f"wheel: {sys.argv[1].rsplit('/', 1)[-1]}, {len(names)} files, presets included")
PY
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH_SPEC"
"$WORK/venv/bin/pip" install -q "$WHEEL"
cd "$WORK"  # nothing of the repository here
"$WORK/venv/bin/leanlm" train tiny train.steps=3 eval.every=0 checkpoint.every=0 log.progress=false \
    data.tokenizer_sample_mb=1 train.out_dir="$WORK/run"
test -s "$WORK/run/metrics.jsonl"
# Hugging Face out and back in, from the wheel alone (no transformers in this venv)
"$WORK/venv/bin/leanlm" export "$WORK/run" "$WORK/hf"
test -s "$WORK/hf/model.safetensors" && test -s "$WORK/hf/tokenizer.json"
"$WORK/venv/bin/leanlm" train tiny train.steps=1 eval.every=0 checkpoint.every=0 log.progress=false \
    train.init_from="$WORK/hf" train.out_dir="$WORK/run2"
test -s "$WORK/run2/tokenizer.json"
# lm_eval is an extra: without it, `leanlm eval --tasks` is one line naming it (exit 2)
if "$WORK/venv/bin/leanlm" eval "$WORK/run2" --tasks hellaswag 2> "$WORK/eval.err"; then exit 1; fi
grep -q "pip install 'leanlm\[eval\]'" "$WORK/eval.err"
echo "wheel check: leanlm train tiny, export and train.init_from ran from the installed wheel"
