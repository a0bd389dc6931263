#!/usr/bin/env bash
# The README's cpu-preset chain on a lent GPU machine (the `device` tool), so that its artifacts carry
# the same keys as the same command on a CPU here:
#   - the tree arrives without .git: .devdata/manifest (`git ls-files -s` of a clean commit, made by
#     `benchmarks/gpu_chain.sh --pack`) is checked file by file against the blobs' hashes, and the
#     commit is passed on as REPLEARN_SOURCE_COMMIT (with -dirty if any file differs);
#   - the data arrive in .devdata/ (one parquet file per call: a call carries at most 64 MiB) and are
#     put at /work/shared/data with their mtimes, and the tree at /work/main, so that `../shared/data`
#     resolves to the same path, size and mtime that the data identities hash;
#   - the small artifacts (results, curves, logs, sample grids, the table) come back as one tarball.
# usage here:   benchmarks/gpu_chain.sh --pack            (writes .devdata/manifest, .devdata/*.mtime)
# usage there:  bash benchmarks/gpu_chain.sh STEP          (STEP: kmeans | table; $OUT receives the logs)
set -euo pipefail

DATA_VARS=(PRETRAIN_DATA=../shared/data/tinyimagenet/train.parquet
           "CIFAR_TRAIN=../shared/data/cifar10/train.parquet[:40000]"
           "CIFAR_TEST=../shared/data/cifar10/train.parquet[40000:]"
           "DATA_NOTE=shared CIFAR-10 copy, JPEG q75")

if [ "${1:-}" = "--pack" ]; then
  test -z "$(git status --porcelain --untracked-files=no)" || { echo "commit first: the tree is dirty" >&2; exit 2; }
  mkdir -p .devdata
  git rev-parse --short=12 HEAD > .devdata/commit
  git ls-files -s > .devdata/manifest
  for f in cifar10 tinyimagenet; do
    stat -c %.9Y "../shared/data/$f/train.parquet" > ".devdata/$f.mtime"
  done
  echo "packed $(cat .devdata/commit)"
  exit 0
fi

STEP=${1:?kmeans or table}
OUT=${OUT:-/tmp/gpu-chain-out}
mkdir -p "$OUT"
SRC=$(pwd)

# the data, where and as old as they were when the keys were computed
for f in cifar10 tinyimagenet; do
  if [ -f ".devdata/$f.parquet" ]; then
    mkdir -p "/work/shared/data/$f"
    cp ".devdata/$f.parquet" "/work/shared/data/$f/train.parquet"
    touch -d "@$(cat .devdata/$f.mtime)" "/work/shared/data/$f/train.parquet"
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

MAKE=(make PRESET=cpu PY=python3 STAMP= "${DATA_VARS[@]}")
case "$STEP" in
  kmeans) target=kmeans ;;
  table)  target=svm-table ;;
  *) echo "unknown step $STEP" >&2; exit 2 ;;
esac
start=$(date +%s)
# the chain's disk use, sampled every 5 s: its peak is what the README states
( while sleep 5; do echo "$(( $(date +%s) - start )) $(du -sb build cache 2>/dev/null | awk '{s+=$1} END {print s}')"; done ) \
  > "$OUT/disk-$STEP.log" &
sampler=$!
set +e
timeout "${CHAIN_TIMEOUT:-540}" "${MAKE[@]}" "$target" > "$OUT/chain-$STEP.log" 2>&1
rc=$?
set -e
kill $sampler 2>/dev/null || true
echo "peak disk (build + cache): $(sort -k2 -n "$OUT/disk-$STEP.log" | tail -1 | awk '{printf "%.2f GB at %d s", $2/1e9, $1}')"
echo "chain $STEP: rc=$rc in $(( $(date +%s) - start )) s"
df -h /work | tail -1
du -sh build cache 2>/dev/null || true
# what comes back: the table, its figures, and every small artifact (no features, no checkpoints)
tar czf "$OUT/artifacts.tar.gz" --exclude='*.h5' --exclude='*.pt' --exclude='*/samples/step_*' tables build \
  2>/dev/null || true
tail -c 4000 "$OUT/chain-$STEP.log"
exit $rc
