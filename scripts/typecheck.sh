#!/usr/bin/env bash
# Type-check leanlm's three packages with mypy (`make lint` runs this).
#
# The packages install as leanlm.engine / leanlm.optim / leanlm.kernels from the folders engine/,
# optim/ and kernels/ (package-dir), and an editable install maps them with an import hook that
# mypy cannot follow. So mypy reads them through a symlinked tree build/typecheck/leanlm/<pkg>,
# which gives every module its installed name. Settings: [tool.mypy] in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
tree=build/typecheck
mkdir -p "$tree/leanlm"
for pkg in engine optim kernels; do
  ln -sfn "$PWD/$pkg" "$tree/leanlm/$pkg"
done
cd "$tree"
MYPYPATH="$PWD" "$OLDPWD/$PY" -m mypy --config-file "$OLDPWD/pyproject.toml" \
  -p leanlm.engine -p leanlm.optim -p leanlm.kernels
