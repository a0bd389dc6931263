#!/usr/bin/env bash
# The `cpu` preset's pretraining curves (issue: a CPU scale where the gain is real), on any machine:
#   PHASE=pretrain|curve|all  TIN=<Tiny ImageNet parquet>  CIFAR=<CIFAR-10 parquet>  OUTDIR=<results>
# Pretrains DCGAN and WGAN-GP (WGAN_MODEL: the preset's wgan-gp-bn-ttur; wgan-gp for the reference recipe)
# with the cpu preset's settings for a fixed number of generator steps (DCGAN_STEPS, WGAN_STEPS; the
# preset itself is 67 + 48 min on a 2-core AVX512-BF16 CPU), then scores the
# log-spaced checkpoints with the curve stage (400 per class, bracketed C). Each curve JSON carries
# the commit and hardware; copies land in OUTDIR.
set -euo pipefail
PHASE=${PHASE:-all}; TIN=${TIN:-../shared/data/tinyimagenet/train.parquet}
CIFAR=${CIFAR:-../shared/data/cifar10/train.parquet}; OUTDIR=${OUTDIR:-benchmarks/results/cpu_preset}
DCGAN_STEPS=${DCGAN_STEPS:-2000}; WGAN_STEPS=${WGAN_STEPS:-2000}; MINUTES=${MINUTES:-0}
WGAN_MODEL=${WGAN_MODEL:-wgan-gp-bn-ttur}
PY=${PY:-python3}; ROOT=${ROOT:-build/cpu-curve}; TRAIN_SPEC=${TRAIN_SPEC:-$CIFAR[:40000]}; TEST_SPEC=${TEST_SPEC:-$CIFAR[40000:]}
mkdir -p "$OUTDIR"
if [[ $PHASE == pretrain || $PHASE == all ]]; then
  for m in dcgan:$DCGAN_STEPS $WGAN_MODEL:$WGAN_STEPS; do
    $PY -m replearn pretrain model=${m%%:*} preset=cpu steps=${m##*:} max_minutes=$MINUTES data="$TIN" \
      run_dir=$ROOT/${m%%:*} ckpt_every=100000 sample_every=500 log_every=20 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it" || true
  done
fi
if [[ $PHASE == curve || $PHASE == all ]]; then
  for m in dcgan $WGAN_MODEL; do
    $PY -m replearn curve run=$ROOT/$m preset=cpu train="$TRAIN_SPEC" test="$TEST_SPEC" ${CURVE_ARGS:-} 2>&1 \
      | tr '\r' '\n' | grep -v "it/s\|s/it\|img/s\|fit/s" || true
    cp $ROOT/$m/curve-*.json "$OUTDIR/$m-curve.json"; cp $ROOT/$m/curve-*.png "$OUTDIR/$m-curve.png"
    cp $ROOT/$m/log.jsonl "$OUTDIR/$m-log.jsonl"; cp "$(ls $ROOT/$m/samples/*.png | tail -1)" "$OUTDIR/$m-samples.png"
  done
fi
