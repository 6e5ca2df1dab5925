#!/usr/bin/env bash
# The GPU checks of the decoding and forward benchmarks, as one command for a lent H100/H200 (bfloat16 throughout):
#
#   bash bench/gpu_check.sh            # logs into $OUT (default /tmp/gpu_check), one per step
#
# 1. bench/generate.py, InternVL2.5-1B shapes, ours vs transformers (sdpa), batch 1 and 8; ours also with XLA's
#    default options for its decode programs (--also-xla-defaults): whether the GPU entry of
#    internvl_jax.generate.DECODE_COMPILER_OPTIONS (no Triton GEMMs, so cuBLAS) is the faster setting
# 2. the same with InternVL2.5-8B shapes
# 3. bench/forward.py, InternVL2.5-1B shapes, ours vs transformers
#
# The steps run in this order of importance. Each gets at most its own budget and what is left of DEADLINE_S
# (default 560 s, under the device tool's 600 s per command): a slow step costs the later ones their turn, never
# the logs of the earlier ones. Compiling ours (prefill and decode, per batch size) is most of each step's time,
# and is the guess in these budgets: no GPU has run them yet. PRESETS_1B / PRESETS_8B /
# REPEATS change the shapes and rounds (e.g. PRESETS_1B=tiny-qwen2 PRESETS_8B=tiny-llama to try the script on a
# CPU). GENERATE_ARGS is added to every generate step. A step that fails (not by its timeout) with a cuDNN error in
# its log is run again once with "--attention batched" (plain XLA), as NAME-batched: cuDNN refusing a shape only when
# compiling is what the trace-time fallback in internvl_jax.attention cannot catch.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-560}
P1=${PRESETS_1B:-InternVL2_5-1B}
P8=${PRESETS_8B:-InternVL2_5-8B}
R=${REPEATS:-3}

run() {  # run NAME BUDGET_S SCRIPT ARGS...
    local name=$1 budget=$2
    shift 2
    local left=$((DEADLINE_S - ($(date +%s) - START)))
    ((budget > left)) && budget=$left
    if ((budget < 20)); then
        echo "=== $name: skipped, ${left}s left" | tee "$OUT/$name.log"
        return
    fi
    echo "=== $name (at most ${budget}s): $*" | tee "$OUT/$name.log"
    timeout "$budget" "$PY" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $(($(date +%s) - START))s in all" | tee -a "$OUT/$name.log"
    return "$status"
}

retrying() {  # retrying NAME BUDGET_S SCRIPT ARGS...: run, then once more on plain XLA attention if cuDNN failed
    local name=$1 budget=$2
    shift 2
    run "$name" "$budget" "$@"
    local status=$?
    # not after a timeout (124) or a kill (137): a rerun would take the time of the steps after it
    if ((status != 0 && status != 124 && status != 137)) &&
        grep -Eqi "cudnn.*(error|fail|status|unsupported|not supported)" "$OUT/$name.log"; then
        run "$name-batched" "$budget" "$@" --attention batched
    fi
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
  "$PY" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__,
torch.cuda.is_available(), '| transformers', transformers.__version__)" 2>&1; } | tee "$OUT/machine.log"

GEN=(bench/generate.py ${GENERATE_ARGS:-} --dtypes bfloat16 --batches 1,8 --repeats "$R" --also-xla-defaults)
retrying generate-1b 210 "${GEN[@]}" --preset "$P1"
retrying generate-8b 280 "${GEN[@]}" --preset "$P8"
retrying forward-1b 70 bench/forward.py --preset "$P1" --dtype bfloat16
echo "done in $(($(date +%s) - START))s; logs in $OUT"
