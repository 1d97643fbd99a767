#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one run (under 6 minutes on an H100/H200), printed as markdown.
#
#   bash bench/gpu.sh                    # --device cuda: ResNet-50, 224 and 96 px, batch 256, compiled reference
#   bash bench/gpu.sh --device cpu --quick   # the same code paths, shrunk to a few minutes on a small CPU
#
# Runs bench/train_throughput.py (memory / compiled / per-sample cached / batched device feeds, and the trainer's
# own loop) at each size, then its --speed-options (fused SGD and CUDA graphs: the GPU defaults still to decide, at
# 96 px), then bench/gradcam.py. Without Caltech JPEGs at $RESLENS_BENCH_ROOT it writes synthetic
# ones into a temporary folder. A sub-benchmark that fails is reported as failed; the others still run.
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) [ $# -ge 2 ] || { echo "gpu.sh: --device needs a value (cuda or cpu)" >&2; exit 2; }
              DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (use --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done

case "$DEVICE" in cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
if [ "$DEVICE" = cuda ] && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu.sh: PyTorch sees no CUDA GPU here; run it on a GPU machine, or try the CPU paths with --device cpu --quick" >&2
  exit 2
fi

ROOT="${RESLENS_BENCH_ROOT:-/work/shared/data/caltech101-mini}"
WORKERS="${RESLENS_BENCH_WORKERS:-$(python -c 'import os; print(max(0, min(12, (os.cpu_count() or 1) - 2)))')}"
if [ "$QUICK" = 1 ]; then
  THROUGHPUT=(--arch resnet18 --sizes 32 --batch 8 --steps 3 --load-batches 5 --synthetic 96 --trainer-epochs 2
              --workers 0 --no-decode)
  GRADCAM=(--repeats 3 --size 64)
  OPTIONS=(--arch resnet18 --sizes 32 --batch 8 --steps 3)
else
  THROUGHPUT=(--arch resnet50 --sizes 224 96 --batch 256 --steps 8 --load-batches 8 --synthetic 6144
              --trainer-epochs 2 --workers "$WORKERS")
  GRADCAM=()
  OPTIONS=(--arch resnet50 --sizes 96 --batch 256 --steps 8)  # 96 px: where per-step overhead shows most
fi
if [ "$DEVICE" = cpu ]; then
  THREADS=(--threads "$([ "$QUICK" = 1 ] && echo 1 || python -c "import os; print(os.cpu_count() or 1)")")
  THROUGHPUT+=("${THREADS[@]}")
  OPTIONS+=("${THREADS[@]}")
fi

# one image cache for this run, removed at the end (the user's own cache is left alone)
export RESLENS_HOME="$(mktemp -d "${TMPDIR:-/tmp}/reslens-gpu-bench-XXXXXX")"
trap 'rm -rf "$RESLENS_HOME"' EXIT

started=$(date +%s)
failed=()
python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, " + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"))'
echo
echo "### Training throughput (bench/train_throughput.py --device $DEVICE --compile --trainer ${THROUGHPUT[*]})"
echo
if ! python bench/train_throughput.py --device "$DEVICE" --root "$ROOT" --compile --trainer "${THROUGHPUT[@]}"; then
  failed+=("train_throughput")
  echo "(bench/train_throughput.py failed; its rows above are partial)"
fi

echo
echo "### Speed options (bench/train_throughput.py --device $DEVICE --speed-options ${OPTIONS[*]})"
echo
if ! python bench/train_throughput.py --device "$DEVICE" --speed-options "${OPTIONS[@]}"; then
  failed+=("speed_options")
  echo "(bench/train_throughput.py --speed-options failed)"
fi

echo
GRADCAM=(--device "$DEVICE" "${GRADCAM[@]}")  # batches 1 and 16 are bench/gradcam.py's default
echo "### Grad-CAM (bench/gradcam.py ${GRADCAM[*]})"
echo
echo '```'
if ! python bench/gradcam.py "${GRADCAM[@]}"; then
  failed+=("gradcam")
  echo "(bench/gradcam.py failed)"
fi
echo '```'

echo
echo "Total: $(( $(date +%s) - started )) s on $DEVICE$([ "$QUICK" = 1 ] && echo ' (--quick)')."
if [ ${#failed[@]} -gt 0 ]; then
  echo "Failed sub-benchmarks: ${failed[*]}"
  exit 1
fi
