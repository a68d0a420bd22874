#!/usr/bin/env bash
# GPU check of the PPO hybrid engine (one GPU, no network, under 8 minutes).
#
#   bash benchmarks/gpu_check.sh WHEEL_DIR [OUT_DIR]
#
# WHEEL_DIR holds the wheels the GPU machine lacks and nothing else is installed: deepspeed (a pure-Python wheel:
# `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8`), pydantic + pydantic-core + annotated-types +
# typing-inspection, hjson, and transformers==5.24.0 (the version the project pins); torch, tokenizers,
# safetensors, huggingface-hub, numpy, pyyaml, peft come from the machine. They are installed with
# `pip install --no-index --no-deps --target` into a private folder (the machine's environment is not touched).
#
# What it measures, on a 1.3B-shaped random-init OPT (hidden 2048, 24 layers, vocab 50272) in bf16:
#   generation tokens/s of (a) our portable hybrid engine under ZeRO-3, (b) naive ZeRO-3 generation,
#   (c) plain generate on an unsharded copy, (d) DeepSpeed's Hybrid Engine (ZeRO-0 and ZeRO-3) where it runs;
#   PPO step time and samples/s at ZeRO-0 and ZeRO-3; decode tokens/s as a fraction of the HBM roofline
#   (batch x HBM bandwidth / model bytes: every decode step reads every weight once).
# Results: OUT_DIR/gpu_check.json, deepspeed_he.json and gpu_check.log (default OUT_DIR: ./gpu-check-out).
set -euo pipefail
WHEELS=${1:?usage: gpu_check.sh WHEEL_DIR [OUT_DIR]}
OUT=${2:-./gpu-check-out}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SITE=${GPU_CHECK_SITE:-/tmp/rlhf-gpu-check-site}
mkdir -p "$OUT"
ls "$WHEELS"/*.whl >/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/rlhf-torch-ext}
unset DS_ACCELERATOR
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu_check.log"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$OUT/gpu_check.log"
# (a)-(c), PPO steps, roofline (~4 min on an H200)
timeout 300 python3 "$ROOT/benchmarks/gpu_check.py" --no-deepspeed-he --out "$OUT" 2>&1 | grep -v -i "warn" | tee -a "$OUT/gpu_check.log"
# (d) DeepSpeed's Hybrid Engine, allowed to fail. Its constructor JIT-builds DeepSpeed's inference op; DeepSpeed's
# op builder cannot parse torch's 'sm_90a'-style arch names (ValueError: int('0a'), seen on an H200 with torch
# 2.11+cu130), so the arch list is pinned to the device's plain capability. The JIT build itself can take minutes.
CAP=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "DeepSpeed Hybrid Engine (TORCH_CUDA_ARCH_LIST=$CAP):" | tee -a "$OUT/gpu_check.log"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} timeout 150 python3 "$ROOT/benchmarks/ppo_throughput.py" \
  --shape opt-1.3b --precision bf16 --new-tokens 64 --repeats 3 --skip-naive --ppo-stages "" --deepspeed-he \
  --json "$OUT/deepspeed_he.json" 2>&1 | grep -v -i "warn" | tee -a "$OUT/gpu_check.log" \
  || echo "DeepSpeed Hybrid Engine run failed or timed out (see above)" | tee -a "$OUT/gpu_check.log"
