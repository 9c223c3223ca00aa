#!/usr/bin/env bash
# The demo's recipe sweep of issue 36 (docs/RESULTS.md, "The demo's recipe chosen on validation"): seven candidates,
# one after another, judged on validation data only. ~45 minutes on 2 CPU cores. Usage: bash benchmarks/demo_recipe.sh OUT
set -euo pipefail
out=${1:-/tmp/recipes}
python "$(dirname "$0")/demo_recipe.py" --out "$out" \
  --candidate "now epochs=6 size=224 optimizer.config.lr=5e-4" \
  --candidate "s192e7 epochs=7 size=192 optimizer.config.lr=5e-4" \
  --candidate "s192e6lr1e-3 epochs=6 size=192 optimizer.config.lr=1e-3" \
  --candidate "lr1e-3 epochs=6 size=224 optimizer.config.lr=1e-3" \
  --candidate "s160e8 epochs=8 size=160 optimizer.config.lr=5e-4" \
  --candidate "s192e7lr1e-3 epochs=7 size=192 optimizer.config.lr=1e-3" \
  --candidate "s192e6lr2e-3 epochs=6 size=192 optimizer.config.lr=2e-3" \
  --candidate "s192e6 epochs=6 size=192 optimizer.config.lr=5e-4"
