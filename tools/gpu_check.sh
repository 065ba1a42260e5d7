#!/usr/bin/env bash
# Every GPU check in one call, for a CUDA machine with the requirements installed (the CPU suite
# does not need a GPU; this is what it cannot check):
#   1. tests/test_cuda.py: fp32 on CUDA = CPU, bf16/fp16 close to fp32, torch.compile (inductor) =
#      eager, train.py --amp fp16 + test.py on GPU and CPU, torchrun on 2 GPUs (when there are 2).
#   2. tools.bench_train on the paper's model (b16): (a)/(b)/(c) in bf16 at growing batch sizes, from the
#      released recipe's 2 up, with peak memory, FLOPs and MFU; the largest batch that fits is printed at the end.
#   3. the same with --compile (inductor) at one batch size, for the compile speed-up.
#
#   tools/gpu_check.sh [OUT_DIR]          # default results/gpu_check; PYTHON=... (default .venv's, else python3)
#   BATCH_SIZES="16 32 64" COMPILE_BATCH=32 tools/gpu_check.sh
#   PARTS="test_cuda bench_bf16" tools/gpu_check.sh   # some of: environment test_cuda bench_bf16 bench_compile
#
# Not run on a GPU yet; estimated 8 to 10 minutes on one H100, most of it compiling: split it with PARTS
# (e.g. test_cuda, then bench_bf16 bench_compile) where one call may last at most 10 minutes.
# Each part has its own time limit and writes its log under OUT_DIR; a failing part does not stop
# the others, and the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-results/gpu_check}
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
BATCH_SIZES=${BATCH_SIZES:-"2 8 16 32 48 64 96 128"}
COMPILE_BATCH=${COMPILE_BATCH:-32}
PARTS=${PARTS:-"environment test_cuda bench_bf16 bench_compile"}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
status=0

part() {  # part NAME SECONDS COMMAND...: run one check with a time limit, log it, remember a failure
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout -k 30 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"  # -k: children that trap SIGTERM too
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

part environment 60 "$PY" -c "import sys, torch, timm, open_clip
print('python', sys.version.split()[0], '| torch', torch.__version__, '| timm', timm.__version__,
      '| open_clip', open_clip.__version__)
print('cuda', torch.version.cuda, '| gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
      '| native bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
if not torch.cuda.is_available():
    sys.exit('no CUDA GPU visible: the other parts would only skip or fail')"
part test_cuda 420 "$PY" -m pytest -q -s -rs tests/test_cuda.py
# shellcheck disable=SC2086  # BATCH_SIZES is a list of numbers
part bench_bf16 240 "$PY" -m tools.bench_train --arch b16 --device cuda --amp bf16 --batch_size $BATCH_SIZES \
  --steps 5 --warmup 2
part bench_compile 480 "$PY" -m tools.bench_train --arch b16 --device cuda --amp bf16 --batch_size "$COMPILE_BATCH" \
  --steps 5 --warmup 3 --compile
echo "logs in $OUT_DIR; exit $status"
exit "$status"
