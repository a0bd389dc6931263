#!/usr/bin/env bash
# The README's cpu-preset chain on a lent GPU machine (the `device` tool), so that its artifacts carry
# the same keys as the same command on a CPU here:
#   - the tree arrives without .git: .devdata/manifest (`git ls-files -s` of a clean commit, made by
#     `benchmarks/gpu_chain.sh --pack`) is checked file by file against the blobs' hashes, and the
#     commit is passed on as REPLEARN_SOURCE_COMMIT (with -dirty if any file differs);
#   - the data arrive in .devdata/ (one parquet file per call: a call carries at most 64 MiB) and are
#     put at /work/shared/data, and the tree at /work/main, so that `../shared/data` resolves to the
#     same path (the data identities hash it with a digest of the bytes);
#   - the small artifacts (results, curves, logs, sample grids, the table) come back as one tarball.
#   - the chain's independent parts run side by side (one GPU, 16 cores: the nets are small), each a
#     `replearn chain` / `replearn curve` call whose artifacts carry the keys the whole chain asks for;
#     the last step is the README's `make svm-table PRESET=cpu`, which reuses them all and writes the table.
# Measured at c6cc4927f40e, one after the other: pretraining 56+79+44+35 s, one critic's features and
# both SVM settings ~75 s, a curve point ~20 s, K-means 188 s: ~18 min in all, more than a session's
# 15 device minutes (benchmarks/results/gpu_cpu_chain/README.md). Side by side it is ~7 min.
# usage here:   benchmarks/gpu_chain.sh --pack DATA       (DATA: cifar10 | tinyimagenet: the one file
#                                                          this call carries; writes .devdata/)
# usage there:  bash benchmarks/gpu_chain.sh STEP          (STEP: data: put the file in place and build
#               its caches | table: everything else; $OUT receives the logs and a tarball)
set -euo pipefail

# PRESET, PRE, TRAIN, TEST: overridable only to rehearse the script here at the tiny preset
PRESET=${PRESET:-cpu}
PRE=${PRE:-../shared/data/tinyimagenet/train.parquet}
TRAIN=${TRAIN:-"../shared/data/cifar10/train.parquet[:40000]"}
TEST=${TEST:-"../shared/data/cifar10/train.parquet[40000:]"}
DATA_VARS=("PRETRAIN_DATA=$PRE" "TRAIN_DATA=$TRAIN" "TEST_DATA=$TEST"
           "DATA_NOTE=shared CIFAR-10 copy, JPEG q75")

if [ "${1:-}" = "--pack" ]; then
  test -z "$(git status --porcelain --untracked-files=no)" || { echo "commit first: the tree is dirty" >&2; exit 2; }
  rm -rf .devdata && mkdir -p .devdata
  cp "../shared/data/${2:?cifar10 or tinyimagenet}/train.parquet" ".devdata/$2.parquet"
  git rev-parse --short=12 HEAD > .devdata/commit
  git ls-files -s > .devdata/manifest
  echo "packed $(cat .devdata/commit)"
  exit 0
fi

STEP=${1:?data or table}
OUT=${OUT:-/tmp/gpu-chain-out}
mkdir -p "$OUT"
SRC=$(pwd)

# the data, where they were when the keys were computed
for f in cifar10 tinyimagenet; do
  if [ -f ".devdata/$f.parquet" ]; then
    mkdir -p "/work/shared/data/$f"
    cp ".devdata/$f.parquet" "/work/shared/data/$f/train.parquet"
  fi
done

# the tree checked against its commit: git's blob hash of every tracked file
COMMIT=$(python3 - <<'EOF'
import hashlib, pathlib
commit = pathlib.Path(".devdata/commit").read_text().strip()
bad = []
for line in pathlib.Path(".devdata/manifest").read_text().splitlines():
    meta, path = line.split("\t", 1)
    blob = meta.split()[1]
    p = pathlib.Path(path)
    data = p.read_bytes() if p.is_file() else b""
    if hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() != blob:
        bad.append(path)
print(commit + ("-dirty" if bad else ""))
if bad:
    import sys
    print("differs from the commit:", *bad[:10], file=sys.stderr)
EOF
)
export REPLEARN_SOURCE_COMMIT=$COMMIT
echo "source commit: $COMMIT"

if [ "$SRC" != /work/main ]; then
  mkdir -p /work/main
  # the tree (and the caches, runs and data a previous call left) in one place
  cp -a "$SRC/." /work/main/
fi
cd /work/main
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10

PY="${PYTHON_BIN:-python3} -m replearn"
DATA=("pretrain_data=$PRE" "train=$TRAIN" "test=$TEST")
start=$(date +%s)
( while sleep 5; do echo "$(( $(date +%s) - start )) $(du -sb build cache 2>/dev/null | awk '{s+=$1} END {print s}')"; done ) \
  > "$OUT/disk-$STEP.log" &
sampler=$!
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
# wait for this shell's background jobs, killing what still runs after $1 seconds
wait_all() {
  local deadline=$(( $(date +%s) + $1 ))
  for p in $(jobs -p); do
    [ "$p" = "$sampler" ] && continue
    while kill -0 "$p" 2>/dev/null; do
      if [ "$(date +%s)" -ge "$deadline" ]; then kill "$p"; break; fi
      sleep 2
    done
  done
}

set +e
rc=0
if [ "$STEP" = data ]; then
  # the caches every later process reads, built once (side-by-side processes would each build them)
  for spec in "${DATA[@]}"; do
    src=${spec#*=}
    [ -f "${src%%\[*}" ] && $PY prepare "source=$src" workers=16 >> "$OUT/chain-data.log" 2>&1
  done
  rc=$?
else
  CH=(chain "preset=$PRESET" "${DATA[@]}" "data_note=shared CIFAR-10 copy, JPEG q75" seed_repeats= curve=0 kmeans=0)
  # the preset's GANs (its models, then its seed repeats of the first) and the run folders the chain keys
  mapfile -t RUNS < <(${PYTHON_BIN:-python3} - "$PRESET" "${DATA[@]}" <<'PYEOF'
import sys
from replearn import chain
from replearn.core.config import build
cfg = build(chain.Config, "chain", {"preset": sys.argv[1], **dict(a.split("=", 1) for a in sys.argv[2:])})
for model, seed, run_dir in chain.planned_runs(cfg):
    print(model, "-" if seed is None else seed, run_dir, int(cfg.curve))
PYEOF
)
  ((${#RUNS[@]})) || { echo "no GANs planned for preset $PRESET" >&2; exit 2; }
  # 1. every pretraining run side by side (each keyed as the chain's own: a seed repeat adds seed=N)
  for line in "${RUNS[@]}"; do
    read -r model seed run curve <<< "$line"
    args=(models="$model"); [ "$seed" = - ] || args+=(pretrain_args="seed=$seed")
    $PY "${CH[@]}" "${args[@]}" upto=pretrain > "$OUT/p-$(basename "$run").log" 2>&1 &
  done
  wait_all "${PRETRAIN_TIMEOUT:-300}"
  stamp "pretraining done"
  # 2. probes (both SVM inputs for the models, the unscaled protocol for the seed repeats), the curves
  #    and K-means, side by side
  for line in "${RUNS[@]}"; do
    read -r model seed run curve <<< "$line"
    if [ "$seed" = - ]; then
      $PY "${CH[@]}" models="$model" upto=svm > "$OUT/s-$(basename "$run").log" 2>&1 &
      [ "$curve" = 1 ] && $PY curve "preset=$PRESET" "run=$run" "${DATA[@]:1}" > "$OUT/c-$(basename "$run").log" 2>&1 &
    else
      $PY "${CH[@]}" models="$model" pretrain_args="seed=$seed" layer_rows=0 upto=svm > "$OUT/s-$(basename "$run").log" 2>&1 &
    fi
  done
  $PY chain "preset=$PRESET" "${DATA[@]}" models= controls=0 curve=0 kmeans=1 upto=svm > "$OUT/k.log" 2>&1 &
  wait_all "${PROBE_TIMEOUT:-420}"
  stamp "probes, curves and K-means done"
  # 3. the README's command: every artifact reused by key, the table written
  timeout 240 make svm-table "PRESET=$PRESET" PY="${PYTHON_BIN:-python3}" STAMP= "${DATA_VARS[@]}" > "$OUT/chain-table.log" 2>&1
  rc=$?
  stamp "table: rc=$rc"
fi
set -e
kill $sampler 2>/dev/null || true
echo "peak disk (build + cache): $(sort -k2 -n "$OUT/disk-$STEP.log" | tail -1 | awk '{printf "%.2f GB at %d s", $2/1e9, $1}')"
df -h /work | tail -1
du -sh build cache 2>/dev/null || true
# what comes back: the table, its figures, and every small artifact (no features, no checkpoints)
tar czf "$OUT/artifacts.tar.gz" --exclude='*.h5' --exclude='*.pt' --exclude='*/samples/step_*' tables build \
  2>/dev/null || true
tail -n 30 "$OUT/chain-$STEP.log" 2>/dev/null
exit $rc
