#!/usr/bin/env bash
# Issue 11, item 5 on a GPU machine, in one prepared run (the device tool lends ~15 minutes).
#
#   make gpu-wheels                      # here, once: .whl/ gets what the GPU image lacks
#   bash scripts/gpu_check.sh            # there (device tool: carry [".whl"]), ~5 minutes
#
# 1. the CUDA cases of the device-parametrized tests (HF parity, quantized kernels, engine
#    parity, every strategy x layout against the CPU's sequential tokens) and the meta-device
#    tests; 2. the batch sweep (`carpool bench`) of the random small and medium models in bf16
#    on the GPU. Everything lands in $OUT (default out/gpu): env.txt, tests.log, bench-*.json
#    and bench-*.log. DEVICE=cpu runs the same steps on the CPU (to try the script itself);
#    PYTHON picks the interpreter (default python3, the image's torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    # Wheels only, into a folder of their own: the image's torch, numpy... stay as they are.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/carpool-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/carpool-site:src${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("cuda", torch.version.cuda, p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
else:
    print("no CUDA device")
EOF
} 2>&1 | tee "$OUT/env.txt"

status=0
# Test ids carry the device ("...-cuda]", "[cuda-..."): -k keeps the cases of this device and
# the meta-device tests; the CPU cases ran in CI already.
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -k "$DEVICE or meta" \
    tests/model/test_hf_parity.py tests/model/test_quant_kernels.py \
    tests/engine/test_engine_parity.py tests/engine/test_strategies.py \
    tests/engine/test_meta_device.py 2>&1 | tee "$OUT/tests.log"
status=$((status | PIPESTATUS[0]))

for cfg in small medium; do
    timeout "${BENCH_TIMEOUT:-150}" "$PY" -c 'import sys; from carpool.cli import main; sys.exit(main())' \
        bench --device "$DEVICE" --random-config "$cfg" --dtype bfloat16 \
        --batch-sizes "${BATCH_SIZES:-1,8,32,64}" --requests "${REQUESTS:-16}" \
        --prompt-len 32 --gen-len 64 --output "$OUT/bench-$cfg.json" 2>&1 | tee "$OUT/bench-$cfg.log"
    status=$((status | PIPESTATUS[0]))
done
echo "gpu_check: exit status $status" | tee -a "$OUT/env.txt"
exit "$status"
