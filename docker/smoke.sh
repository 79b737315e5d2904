#!/usr/bin/env bash
# Smoke test of the megatron-nft image: run at the end of `docker build` (no GPU) and, for the full
# check, in a container with one:  docker run --gpus all --rm IMAGE bash /opt/megatron-nft/docker/smoke.sh
# With a GPU it ends with docker/gpu_smoke.py: SGLang serving a tiny random model, an actor train step
# with Transformer Engine (FP8 where the GPU has it), a weight sync and matching log-probs (~2-3 min).
# Exits non-zero naming the first piece that is missing.
set -euo pipefail

SGLANG_PYTHON=${SGLANG_PYTHON:-/opt/sglang/bin/python}
if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then GPU=1; else GPU=0; fi

echo "== megatron-nft CLI"
megatron-nft --help > /dev/null
megatron-nft plan --model qwen2.5-32b --gpus 128 --prompt-len 2048 --response-len 14336 > /dev/null
python -m launch --list > /dev/null

echo "== trainer environment (GPU visible: ${GPU})"
GPU=${GPU} python - <<'EOF'
import importlib.metadata as md
import os

import megatron.core
import nemo_run
import math_verify
import torch

# NGC's image brings Transformer Engine; the stand-in base that builds the layers where nvcr.io is out of
# reach (docker/here) says it has none, and only then is its absence not a failure
without_te = os.environ.get("BASE_WITHOUT_TRANSFORMER_ENGINE") == "1"
for dist in ("megatron-core", "nemo-run", "leptonai", "math-verify", "transformer_engine", "megatron-nft"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        if dist == "transformer_engine" and without_te:
            print("  transformer_engine: not in this base (a stand-in build: BASE_WITHOUT_TRANSFORMER_ENGINE=1)")
            continue
        raise SystemExit(f"smoke: {dist} is not installed")
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda})")
if os.environ["GPU"] == "1":
    # Transformer Engine's PyTorch extension and megatron-core's TE layers need the driver
    import transformer_engine.pytorch  # noqa: F401
    from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401
    from megatron_nft.model.qwen2 import te_available

    assert torch.cuda.is_available(), "smoke: a GPU is visible to nvidia-smi but not to torch"
    assert te_available(), "smoke: megatron-nft does not see Transformer Engine"
    print("  Transformer Engine layers: ok")
elif not without_te:
    import transformer_engine  # noqa: F401  (the package; its CUDA extension is checked with a GPU)
EOF

if [ -f /opt/sglang/NOT_INSTALLED ] && [ ! -x "${SGLANG_PYTHON}" ]; then
  echo "== SGLang environment: not checked ($(cat /opt/sglang/NOT_INSTALLED))"
else
echo "== SGLang environment (${SGLANG_PYTHON})"
GPU=${GPU} "${SGLANG_PYTHON}" - <<'EOF'
import os

import sglang
import torch
from sglang.srt.managers.io_struct import GenerateReqInput, UpdateWeightsFromDistributedReqInput  # noqa: F401

print(f"  sglang {sglang.__version__}, torch {torch.__version__}")
if os.environ["GPU"] == "1":
    from sglang.srt.entrypoints.http_server import launch_server  # noqa: F401  (loads the CUDA kernels)
    assert torch.cuda.is_available(), "smoke: SGLang's torch does not see the GPU (host driver too old for its CUDA?)"
    print("  SGLang server entry point: ok")
EOF
echo "== one NCCL for trainer and servers (the nccl weight transport needs equal versions)"
trainer_nccl=$(python -c "import torch; print('.'.join(map(str, torch.cuda.nccl.version())))")
sglang_nccl=$("${SGLANG_PYTHON}" -c "import torch; print('.'.join(map(str, torch.cuda.nccl.version())))")
echo "  trainer ${trainer_nccl}, SGLang ${sglang_nccl}"
if [ "${trainer_nccl}" != "${sglang_nccl}" ]; then
  # the build records a mismatch it could not remove (/opt/sglang/NCCL_MISMATCH); any other is a broken image
  [ -f /opt/sglang/NCCL_MISMATCH ] || { echo "smoke: NCCL ${trainer_nccl} (trainer) != ${sglang_nccl} (SGLang)" >&2; exit 1; }
  echo "  warning: rollout.weight_transport=nccl cannot work in this image (use disk): $(cat /opt/sglang/NCCL_MISMATCH)"
fi

fi

echo "== tools the Slurm scripts run in the container"
for tool in pkill torchrun; do command -v "${tool}" > /dev/null || { echo "smoke: ${tool} is missing" >&2; exit 1; }; done

if [ "${GPU}" = 1 ]; then
  # SGLang on a tiny random model, the TE (+FP8) actor's train step, the disk weight sync between
  # them and their log-probs agreeing: one line per check, exit 1 naming the first that fails
  echo "== end to end on the GPU (docker/gpu_smoke.py)"
  python "$(dirname "$0")/gpu_smoke.py" --device cuda --sglang-python "${SGLANG_PYTHON}" \
    || { echo "smoke: the end-to-end GPU check failed (its FAILED line above names the check)" >&2; exit 1; }
fi
echo "smoke: ok"
