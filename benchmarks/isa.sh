#!/bin/sh
# Run a command with every library's CPU kernels limited to an instruction set, e.g.
#   benchmarks/isa.sh AVX2 .venv/bin/python benchmarks/svm.py --parts protocol
# On a Zen 4 (AVX512-BF16) this runs the code paths the AVX2-only kind runs: torch's (MKL, oneDNN, ATen),
# numpy's (OpenBLAS) and replearn's own (REPLEARN_CPU_ISA: no bf16 copies or autocast). Records then name
# the machine "AVX512-BF16 limited to AVX2": an estimate of the AVX2 kind, whose clock and memory differ,
# never a measurement of it.
set -eu
case "${1:-}" in
  AVX2) mkl=AVX2 aten=avx2 onednn=AVX2 openblas=Haswell ;;
  AVX512) mkl=AVX512 aten=avx512 onednn=AVX512_CORE openblas=SkylakeX ;;
  *) echo "usage: benchmarks/isa.sh AVX2|AVX512 COMMAND [ARGS...]" >&2; exit 2 ;;
esac
export REPLEARN_CPU_ISA="$1" MKL_ENABLE_INSTRUCTIONS="$mkl" ATEN_CPU_CAPABILITY="$aten" \
  ONEDNN_MAX_CPU_ISA="$onednn" OPENBLAS_CORETYPE="$openblas"
# torch.compile's kernels in a cache of their own: its default cache key does not see these limits, and a
# normal run that loaded the kernels compiled here crashed ("double free or corruption", the K-means encoder)
export TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/torchinductor_$(id -un)_$1"
shift
exec "$@"
