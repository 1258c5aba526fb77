#!/usr/bin/env bash
# GPU figures in one go (benchmarks/RESULTS.md, "GPU"), about 8 minutes:
# * memory.py: state bytes, XLA temporaries, peak and compile time of the four
#   updates on GPT-2-small shapes and a 200-leaf tree;
# * gpu_peak.py: peak_bytes_in_use (memory_stats) and step time of adamw,
#   dual_optim_plus, dual_optim_plus_8bit and quantize_state(adamw), as
#   update + apply_updates and as dualoptax.update_and_apply (memory.py too);
# * the codec, parity and 8-bit state tests on the GPU backend.
# Installs nothing but wheels carried in .whl/. Logs go to $OUT.
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
{ nvidia-smi -L; $py -c "import jax, optax; print('jax', jax.__version__,
  'optax', optax.__version__, jax.devices())"; } 2>&1 | tee "$out/env.txt"
timeout 120 $py benchmarks/memory.py 2>&1 | tee "$out/memory.txt"
timeout 120 $py -m benchmarks.gpu_peak 2>&1 | tee "$out/gpu_peak.txt"
timeout 90 $py benchmarks/memory.py --trees gpt2 --step train-fused 2>&1 \
  | tee "$out/memory_fused.txt"
timeout 120 $py -m benchmarks.gpu_peak --apply fused 2>&1 \
  | tee "$out/gpu_peak_fused.txt"
timeout 60 $py -m pytest -q -p no:cacheprovider tests/test_quantization.py \
  tests/test_parity.py tests/test_chunked.py 2>&1 | tail -20 \
  | tee "$out/pytest_gpu.txt"
