#!/usr/bin/env bash
# The GPU check, for the first session that is lent a GPU: every CUDA test (the compiled Triton kernels, the
# model on cuda), benchmarks/bench_nf4.py (the kernels vs bitsandbytes' CUDA kernels), and a LoRA and a QLoRA
# training step on SmolLM2-135M on CUDA with the Triton kernels active, against transformers+peft(+bitsandbytes).
# It ends with one summary table; copy its figures into the README with the device named.
#
# On a machine without a CUDA GPU it says so and exits 0: nothing to check there.
#
# The GPU machine has python3 with torch, triton, transformers, peft, safetensors, tokenizers, jinja2 and
# pytest, but no network: packages it lacks travel as wheels in .whl/ (scripts/gpu_wheels.sh fetches
# bitsandbytes and gguf there), and the demo model does not fit, so the training step uses SmolLM2-135M's
# architecture with random weights unless the converted model is in the cache.
#
#   bash scripts/gpu_check.sh [CHECK ...]   (with the device tool: carry [".whl"], timeout ~600 s; the checks,
#                                           default all: cuda-tests train-kernels bench-nf4 step-lora step-qlora
#                                           step-lora-bf16 step-qlora-bf16)
#
# train-kernels: the training kernels' tests (RMSNorm, RoPE, SwiGLU, LoRA, linear + cross-entropy), compiled
# on CUDA against their twins on the CPU (tests/kernel_checks.py), and the loss twin on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
CHECKS="cuda-tests train-kernels bench-nf4 step-lora step-qlora step-lora-bf16 step-qlora-bf16"
for c in "$@"; do
  [[ " $CHECKS " == *" $c "* ]] || { echo "gpu_check: no check named '$c'; the checks: $CHECKS" >&2; exit 2; }
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: skipped: no CUDA GPU here (torch.cuda.is_available() is False, or no torch); nothing to check." \
       "Run it on a machine with an NVIDIA GPU."
  exit 0
fi

site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
# minicustom itself, without its dependencies (the machine has them) and without the network
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site" . || exit 1
# PYTHONSAFEPATH: the installed copy, not ./minicustom (whose kernels/ lives beside it), is what gets imported
# and with it the script's folder is not on sys.path: benchmarks/ goes there by name (bench_sft imports memory_peak)
export PYTHONPATH="$site:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
export TRITON_INTERPRET=0  # compiled kernels, not the interpreter
log=${OUT:-$(mktemp -d)}
"$PY" -c "import torch, triton; print('gpu_check:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"
# the memory bandwidth that bench_nf4's "% peak" columns divide by: the vendor's figure for the device
case "$("$PY" -c "import torch; print(torch.cuda.get_device_name())")" in
  *H200*) peak=4800 ;; *H100*PCIe*) peak=2000 ;; *H100*) peak=3350 ;; *A100*80GB*) peak=2039 ;; *A100*) peak=1555 ;;
  *) peak=${PEAK_GBPS:-3350} ;;
esac

declare -a rows
wanted=" ${*:-$CHECKS} "
run() {  # run NAME COMMAND...: its output to $log/NAME.log and the screen, one summary row (if NAME is wanted)
  local name=$1; shift
  [[ $wanted == *" $name "* ]] || return 0
  local t0=$SECONDS
  "$@" 2>&1 | tee "$log/$name.log"
  local rc=${PIPESTATUS[0]}
  rows+=("| $name | $([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - t0)) s | ${*#"$PY" } |")
}

run cuda-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_model.py -k "cuda or gpu"
run train-kernels "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_train.py tests/test_kernels_lora.py \
  tests/test_kernels_linear_ce.py
run bench-nf4 "$PY" benchmarks/bench_nf4.py --repeats 15 --peak-gbps "$peak"
run step-lora "$PY" benchmarks/bench_sft.py --device cuda --method lora --rounds 1 --steps 5
run step-qlora "$PY" benchmarks/bench_sft.py --device cuda --method qlora --rounds 1 --steps 5
run step-lora-bf16 "$PY" benchmarks/bench_sft.py --device cuda --method lora --rounds 1 --steps 5 --precision bf16
run step-qlora-bf16 "$PY" benchmarks/bench_sft.py --device cuda --method qlora --rounds 1 --steps 5 --precision bf16

echo
echo "## gpu_check summary"
echo "| check | result | time | command |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "### LoRA / QLoRA step (tokens/s, minicustom vs transformers+peft)"
grep -sH "^| \(chat\|all\) " "$log"/step-*.log
! printf '%s\n' "${rows[@]}" | grep -q FAILED
