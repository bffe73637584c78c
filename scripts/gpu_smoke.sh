#!/usr/bin/env bash
# GPU smoke check of the vllm adapter on one CUDA GPU, in under 8 minutes:
#   1. installs the vllm extra into .venv (uv when present: much faster than pip);
#   2. runs the engine contract against a real small model through the vllm adapter;
#   3. runs the `gpu`-marked tests;
#   4. measures tokens/s at 1, 8 and 32 concurrent requests (benchmarks/engine_throughput.py).
# The model comes from the Hugging Face hub (SLM_GPU_MODEL, default Qwen/Qwen2.5-0.5B-Instruct).
# Output: bench_out/gpu_smoke/{contract,gpu_tests,throughput}.txt and throughput.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${SLM_GPU_MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
OUT="${SLM_SMOKE_OUT:-bench_out/gpu_smoke}"
PY=.venv/bin/python
mkdir -p "$OUT"
start=$(date +%s)
step() { echo "== $(( $(date +%s) - start ))s: $*"; }
failed=0  # each check runs even when an earlier one failed; the exit status says if any did

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

step "installing the vllm extra"
EXTRAS='.[vllm]'
if [ ! -x "$PY" ]; then  # a bare machine: the venv with the dev tools too
  python3 -m venv .venv
  EXTRAS='.[vllm,dev]'
fi
if command -v uv >/dev/null 2>&1; then
  timeout 300 uv pip install --python "$PY" -q -e "$EXTRAS"
else
  timeout 300 "$PY" -m pip install -q -e "$EXTRAS"
fi
"$PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"

step "engine contract through the vllm adapter on $MODEL"
# One real engine is shared by the contract's tests, so they run on one event loop.
SLM_CONTRACT_VLLM_MODEL="$MODEL" timeout 240 "$PY" -m pytest -q -p no:cacheprovider \
  -o asyncio_default_test_loop_scope=session -o asyncio_default_fixture_loop_scope=session \
  tests/contract/test_engine_contract.py -k vllm 2>&1 | tee "$OUT/contract.txt" || failed=1

step "gpu tests"
SLM_GPU_MODEL="$MODEL" timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/unit/test_vllm_adapter.py 2>&1 | tee "$OUT/gpu_tests.txt" || failed=1

step "tokens/s at 1, 8 and 32 concurrent requests"
timeout 180 "$PY" -m benchmarks.engine_throughput \
  --engine "{\"kind\": \"vllm\", \"model\": \"$MODEL\", \"max_model_len\": 2048, \"gpu_memory_utilization\": 0.5}" \
  --levels 1,8,32 --rounds 2 --max-tokens 128 --json-out "$OUT/throughput.json" 2>&1 | tee "$OUT/throughput.txt" || failed=1

step "done (failed=$failed)"
exit "$failed"
