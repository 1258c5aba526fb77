#!/usr/bin/env bash
# GPU figures in one go (benchmarks/RESULTS.md, "GPU"): step_time.py at the issue's
# 16.8M params and at 134M, the PyTorch reference points (torch AdamW, bitsandbytes'
# AdamW8bit when its wheel is in .whl/), and the codec / reference-parity / wrapper
# tests run on the GPU backend. Writes logs to $OUT (default /tmp/gpu-out).
#     bash benchmarks/gpu.sh
set -u
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi -L; $py -c "import jax, optax, numba; print('jax', jax.__version__,
  'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$out/env.txt"
timeout 170 $py benchmarks/step_time.py --reps 30 2>&1 | tee "$out/step_time_16M.txt"
timeout 170 $py benchmarks/step_time.py --reps 20 --leaves 32 2>&1 \
  | tee "$out/step_time_134M.txt"
for n in 4 32; do
  timeout 60 $py benchmarks/torch_reference.py --reps 30 --leaves $n 2>&1 \
    | grep -v Warning | tee "$out/torch_$n.txt"
done
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_quantization.py \
  tests/test_parity.py tests/test_quantized_state.py 2>&1 | tail -40 \
  | tee "$out/pytest_gpu.txt"
