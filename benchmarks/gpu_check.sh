#!/usr/bin/env bash
# One-command GPU check of attnzoo (about 8 minutes on one H100/H200; every step has a hard time cap).
#
#   bash benchmarks/gpu_check.sh [REPORT_DIR]        # REPORT_DIR defaults to $OUT, else ./gpu_check_out
#
# 1. environment and installation: the checkout on PYTHONPATH (no install needed), missing dependencies of the dev
#    extra by pip when an index is reachable; wheels in .whl/ (e.g. a natten wheel built for this torch and CUDA)
#    are installed without an index.
#    natten 0.21.7 ships no CUDA wheel on PyPI (its CUDA builds come from whl.natten.org for some torch versions,
#    otherwise a source build of its CUTLASS kernels, far longer than this check); without a natten that has
#    libnatten the `natten` backend declines on CUDA and the report says so.
# 2. CUDA tests with ATTNZOO_TEST_DEVICE=cuda: flex/natten engine parity forward+backward against the reference,
#    the flex test file (block masks, compiled half precision, no recompilation), conformance of every mechanism
#    in float32 and bfloat16 (and under torch.compile).
# 3. `attnzoo train --device cuda`: killed after its first checkpoint, then resumed; a one-rank torchrun (NCCL) run.
# 4. `benchmarks/engine.py --device cuda`: R1/R2, compile and block-mask times, auto's choice (bf16).
# Everything goes to REPORT_DIR/gpu_check_report.txt (summary first) and REPORT_DIR/engine_gpu.json.
set -u
cd "$(dirname "$0")/.."
REPORT_DIR="${1:-${OUT:-$PWD/gpu_check_out}}"
mkdir -p "$REPORT_DIR"
LOG="$REPORT_DIR/gpu_check_log.txt"
REPORT="$REPORT_DIR/gpu_check_report.txt"
: >"$LOG"
export PYTHONUNBUFFERED=1 ATTNZOO_TEST_DEVICE=cuda
PY="${PYTHON:-python3}"
SUMMARY=()
START=$(date +%s)

step() {  # step NAME CAP_SECONDS COMMAND...: run with a hard cap, log everything, record PASS/FAIL/TIMEOUT
  local name="$1" cap="$2"
  shift 2
  local t0=$(date +%s)
  echo "===== $name (cap ${cap}s): $*" | tee -a "$LOG"
  timeout -k 10 "$cap" "$@" >>"$LOG" 2>&1
  local rc=$?
  local status=PASS
  [ $rc -ne 0 ] && status="FAIL (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMEOUT after ${cap}s"
  SUMMARY+=("$(printf '%-34s %-22s %4ss' "$name" "$status" $(($(date +%s) - t0)))")
  echo "----- $name: $status" | tee -a "$LOG"
}

# ---- 1. environment and installation
{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} >>"$LOG" 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/attnzoo_site .whl/*.whl >>"$LOG" 2>&1 &&
    export PYTHONPATH="/tmp/attnzoo_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself (pure Python; the CPU kernel builds at run time)
missing() {
  "$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('torch', 'einops', 'safetensors', 'rich', 'matplotlib', 'pytest', 'hypothesis', 'timm') if u.find_spec(m) is None))"
}
MISSING=$(missing)
INSTALL="the checkout on PYTHONPATH, the image's packages"
if [ -n "$MISSING" ]; then  # the dev extra's packages, when a package index is reachable
  if timeout 120 "$PY" -m pip install -q --retries 0 --timeout 5 $MISSING >>"$LOG" 2>&1; then
    INSTALL="$INSTALL, pip installed: $MISSING"
  else
    INSTALL="$INSTALL; no package index reachable for: $MISSING"
  fi
  MISSING=$(missing)
fi
NATTEN=$("$PY" -c "import natten; print(natten.__version__, 'libnatten' if getattr(natten, 'HAS_LIBNATTEN', False) else 'without libnatten (no fused CUDA kernels)')" 2>/dev/null || echo "not installed")
echo "install: $INSTALL; natten: $NATTEN; missing modules: ${MISSING:-none}" | tee -a "$LOG"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA is not available: nothing to check" | tee "$REPORT"
  exit 1
fi

# ---- 2. CUDA tests
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --no-header -rs)
SUBSET="13-k3 or 7x9 or 8x6 or 12x8 or 5x4x6 or 3x4x5"
step "engine parity fwd+bwd (f32)" 130 "${PYTEST[@]}" tests/ops/test_backends.py \
  -k "test_matches_reference and f32 and ((flex and extras and not broadcast) or (natten and lse) or (tiled and extras and not broadcast)) and ($SUBSET)"
step "engine half precision (bf16/f16)" 60 "${PYTEST[@]}" tests/ops/test_backends.py -k "test_half_precision_forward and (flex or natten)"
step "flex tests (block mask, compile)" 70 "${PYTEST[@]}" tests/ops/test_flex_and_natten_backends.py -k "not test_forward_matches_reference"
step "conformance f32 + bf16 + compile" 110 "${PYTEST[@]}" tests/mechanisms/test_conformance.py \
  -k "shape_and_finite or every_parameter or bfloat16 or torch_compile"

# ---- 3. training on the GPU: interrupted after the first checkpoint, then resumed; torchrun with NCCL
RUN_DIR="$(mktemp -d)/run"
train_and_resume() {
  "$PY" -m attnzoo train --device cuda --mixer neighborhood --dataset synthetic --epochs 2 --batch-size 32 \
    --limit-train 512 --limit-eval 64 --checkpoint-every 4 --log-every 4 --no-progress --out "$RUN_DIR" &
  local pid=$!
  for _ in $(seq 1 60); do [ -f "$RUN_DIR/checkpoint.safetensors" ] && break; sleep 1; done
  kill -9 $pid 2>/dev/null && echo "killed the run after its first checkpoint" || echo "the run ended before the kill"
  wait $pid 2>/dev/null
  "$PY" -m attnzoo train --resume "$RUN_DIR" --device cuda --no-progress
}
export -f train_and_resume
export PY RUN_DIR
step "train --device cuda + resume" 75 bash -c train_and_resume
step "torchrun 1 rank (NCCL)" 45 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m attnzoo train \
  --device cuda --mixer neighborhood --dataset synthetic --epochs 1 --batch-size 32 --limit-train 128 \
  --limit-eval 32 --no-progress --out "$RUN_DIR-ddp"

# ---- 4. GPU benchmark
step "engine benchmark --device cuda" 170 "$PY" benchmarks/engine.py --device cuda --min-run-time 0.4 \
  --json "$REPORT_DIR/engine_gpu.json"

{
  echo "attnzoo GPU check, $(date -u), total $(($(date +%s) - START)) s"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo "install: $INSTALL"
  echo "natten: $NATTEN"
  echo
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "== benchmark"
  sed -n '/===== engine benchmark/,/----- engine benchmark/p' "$LOG" | grep -v "^=====\|^-----" | grep -v "Warning\|warn(" | tail -40
  echo
  echo "== skipped and failed tests"
  grep -E "^(SKIPPED|FAILED|ERROR)" "$LOG" | sort | uniq -c | sort -rn | head -40
  echo
  echo "== full log: $LOG"
} >"$REPORT"
cat "$REPORT"
