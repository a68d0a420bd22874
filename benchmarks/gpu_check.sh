#!/usr/bin/env bash
# GPU check of the PPO hybrid engine and the tiny pipeline (one GPU, no network, about 10 minutes).
#
#   bash benchmarks/gpu_check.sh WHEEL_DIR [OUT_DIR]
#
# WHEEL_DIR holds the wheels the GPU machine lacks and nothing else is installed: deepspeed (a pure-Python wheel:
# `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed==0.19.8`), pydantic + pydantic-core + annotated-types +
# typing-inspection, hjson, and transformers==5.24.0 (the version the project pins); torch, tokenizers,
# safetensors, huggingface-hub, numpy, pyyaml, peft come from the machine. The pipeline part (`rlhf run`) also
# needs what the machine lacks of datasets' and the evaluation report's dependencies (datasets, pyarrow, pandas,
# dill, xxhash, multiprocess, fsspec, matplotlib, ...: `pip download` them into WHEEL_DIR beside the others; Prefect
# is not needed, the run uses --no-prefect). They are installed with `pip install --no-index --no-deps --target`
# into a private folder (the machine's environment is not touched).
#
# What it measures, on a 1.3B-shaped random-init OPT (hidden 2048, 24 layers, vocab 50272) in bf16, at batch 8
# and 32 (32 prompt tokens, 64 new tokens):
#   generation tokens/s of (a) our portable hybrid engine under ZeRO-3 with HF generate, (a') the same engine with
#   the static-cache decode loop, its step torch.compile'd with CUDA graphs (ppo.generation=auto on CUDA; compile
#   time printed apart), (b) naive ZeRO-3 generation (batch 8 only), (c) plain generate on an unsharded copy,
#   (d) DeepSpeed's Hybrid Engine (ZeRO-0 and ZeRO-3) where it runs; each as a share of the HBM roofline
#   (batch x measured copy bandwidth / model bytes: every decode step reads every weight once); at batch 8 also PPO
#   step time and samples/s at ZeRO-0 and ZeRO-3 and the SmolLM2-shaped LoRA rows (e)/(f). Then the whole tiny
#   pipeline (`rlhf run`, data -> sft -> reward -> ppo -> eval) on the GPU in bf16.
# Results: OUT_DIR/gpu_check.json, deepspeed_he.json, tiny-run.json and gpu_check.log (default ./gpu-check-out).
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
# (a)-(c), PPO steps, roofline, batch 8 and 32 (~5 min on an H200, most of it compilation)
timeout 420 python3 "$ROOT/benchmarks/gpu_check.py" --no-deepspeed-he --out "$OUT" 2>&1 | grep -v -i "warn" | tee -a "$OUT/gpu_check.log"
# (d) DeepSpeed's Hybrid Engine, allowed to fail. Its constructor JIT-builds DeepSpeed's inference op; DeepSpeed's
# op builder cannot parse torch's 'sm_90a'-style arch names (ValueError: int('0a'), seen on an H200 with torch
# 2.11+cu130), so the arch list is pinned to the device's plain capability. The JIT build itself can take minutes.
CAP=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
echo "DeepSpeed Hybrid Engine (TORCH_CUDA_ARCH_LIST=$CAP):" | tee -a "$OUT/gpu_check.log"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$CAP} timeout 150 python3 "$ROOT/benchmarks/ppo_throughput.py" \
  --shape opt-1.3b --precision bf16 --new-tokens 64 --repeats 3 --skip-naive --ppo-stages "" --deepspeed-he \
  --json "$OUT/deepspeed_he.json" 2>&1 | grep -v -i "warn" | tee -a "$OUT/gpu_check.log" \
  || echo "DeepSpeed Hybrid Engine run failed or timed out (see above)" | tee -a "$OUT/gpu_check.log"
# the whole tiny pipeline on the GPU in bf16 (every training stage exercised there), allowed to fail
echo "tiny pipeline (rlhf run --no-prefect, bf16, cuda):" | tee -a "$OUT/gpu_check.log"
timeout 300 python3 -m rlhf_tasks.cli run --no-prefect --store "$OUT/tiny-store" --summary-json "$OUT/tiny-run.json" \
  --set execution.device=cuda --set sft.precision=bf16 --set reward.precision=bf16 \
  --set ppo.actor.precision=bf16 --set ppo.critic.precision=bf16 2>&1 | grep -v -i "warn" | tail -40 \
  | tee -a "$OUT/gpu_check.log" || echo "tiny pipeline failed or timed out (see above)" | tee -a "$OUT/gpu_check.log"
