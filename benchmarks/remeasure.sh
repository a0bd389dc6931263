#!/usr/bin/env bash
# Every measurement issue 40 asks of a CPU kind, in order, on the machine at hand, natively (run it on the
# AVX2-only EPYC: the records of that kind are the ones still missing; elsewhere it refreshes that kind's).
#   benchmarks/remeasure.sh --list            the steps, their commands and rough times (AVX2 kind, 2 cores)
#   benchmarks/remeasure.sh [STEP ...]        run these steps (default: all), one after the other, each under
#                                             the heavy-job lock, stopping at the first that fails
# Run it from a clean checkout (every record names its commit; -dirty ones are not quoted), with
# ../shared/data beside it and `make setup` done. Each step writes its own JSON in benchmarks/results/
# (the benchmarks keep the records they replace); commit them with a note in benchmarks/results/notes.md.
# `bn300` rebuilds the trained-critic features the full setting is measured on, where cache/ lacks them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOCK=${LOCK:-/tmp/replearn-heavy.lock}
DATA=../shared/data
BN300_RUN=build/bench/bn300

declare -A CMD MINUTES
STEPS=(ceiling quick svm-protocol bn300 svm-full cpu-eval)
CMD[ceiling]="$PY benchmarks/ceiling.py"
MINUTES[ceiling]=1
CMD[quick]="$PY benchmarks/train.py --quick && $PY benchmarks/features.py --quick && $PY benchmarks/kmeans.py --quick && $PY benchmarks/svm.py --quick"
MINUTES[quick]=10
CMD[svm-protocol]="$PY benchmarks/svm.py --parts protocol"
MINUTES[svm-protocol]=25
# the recipe of svm.json's full_setting records: a BN WGAN-GP critic, 300 float32 steps, all 50,000 train rows
CMD[bn300]="test -e cache/bn300.h5 || { $PY -m replearn pretrain model=wgan-gp-bn-ttur preset=cpu steps=300 precision=fp32 \
data=$DATA/tinyimagenet/train.parquet run_dir=$BN300_RUN && $PY -m replearn features run=$BN300_RUN \
train=$DATA/cifar10/train.parquet 'test=$DATA/cifar10/train.parquet[40000:]' precision=fp32 out=cache/bn300.h5; }"
MINUTES[bn300]=30
# with the exhaustive search beside it (no --reuse-exhaustive: that record is another kind's): ~20 min more
CMD[svm-full]="$PY benchmarks/svm.py --full-setting --features cache/bn300.h5 --presearch 4000 --c-scale norm"
MINUTES[svm-full]=35
CMD[cpu-eval]="rm -rf build/cpu_eval && $PY benchmarks/cpu_eval.py --work build/cpu_eval"
MINUTES[cpu-eval]=80

if [ "${1:-}" = "--list" ]; then
  for s in "${STEPS[@]}"; do printf '%-13s ~%3s min  %s\n' "$s" "${MINUTES[$s]}" "${CMD[$s]}"; done
  exit 0
fi
chosen=("$@")
[ ${#chosen[@]} -eq 0 ] && chosen=("${STEPS[@]}")
for s in "${chosen[@]}"; do
  [ -n "${CMD[$s]+x}" ] || { echo "remeasure: unknown step '$s'; choose from: ${STEPS[*]}" >&2; exit 2; }
done
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "remeasure: the checkout has uncommitted changes: commit or stash them (records must name a clean commit)" >&2
  exit 2
fi
for s in "${chosen[@]}"; do
  echo "== remeasure $s (~${MINUTES[$s]} min on 2 AVX2 cores): ${CMD[$s]}" >&2
  flock "$LOCK" bash -c "${CMD[$s]}"
done
