# megatron-nft for GPU clusters: NVIDIA's PyTorch image (CUDA, cuDNN, NCCL, Transformer Engine and apex,
# all built against the image's own torch) + pinned megatron-core, nemo-run, math-verify, this package,
# and SGLang in a virtual environment of its own.
#
#   docker build -t megatron-nft:0.1.0 .
#   enroot import -o megatron-nft.sqsh dockerd://megatron-nft:0.1.0     # for Slurm + pyxis (cluster.container_image)
#   docker run --gpus all --rm megatron-nft:0.1.0 bash /opt/megatron-nft/docker/smoke.sh   # full check on a GPU
#
# Everything is installed at build time; a running container needs no network (HF_HUB_OFFLINE=1: models
# come from a mount, cluster.models_dir).

# megatron-core 0.19 needs Python >= 3.12: NGC PyTorch 25.01 and later (Ubuntu 24.04) ship it.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

# The same pins as pyproject.toml (tests/test_launch.py checks that they agree).
ARG MEGATRON_CORE_VERSION=0.19.2
ARG NEMO_RUN_VERSION=0.11.1
ARG LEPTONAI_VERSION=0.27.3
ARG MATH_VERIFY_VERSION=0.9.0
ARG SGLANG_VERSION=0.5.23

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# 1. Freeze what the base image built together: nothing installed below may replace its torch, TE,
#    apex or flash-attn (a PyPI torch would break their compiled extensions).
RUN python -c "import sys; assert sys.version_info >= (3, 12), 'megatron-core ${MEGATRON_CORE_VERSION} needs Python >= 3.12; base image has ' + sys.version" \
 && pip list --format=freeze | grep -iE '^(torch|torchvision|transformer[-_]engine|apex|flash[-_]attn|triton)==' > /opt/base-constraints.txt \
 && cat /opt/base-constraints.txt

# 2. The trainer and the launcher, against the base image's torch. Dependencies first (a layer that
#    survives code edits), then the package itself without dependencies.
COPY pyproject.toml README.md /opt/megatron-nft/
RUN pip install -c /opt/base-constraints.txt \
      "megatron-core==${MEGATRON_CORE_VERSION}" \
      "nemo-run==${NEMO_RUN_VERSION}" "leptonai==${LEPTONAI_VERSION}" \
      "math-verify[antlr4-13-2]==${MATH_VERIFY_VERSION}" \
      psutil "pebble>=5.0" "transformers>=4.45" "tokenizers>=0.20" "safetensors>=0.4" "pyarrow>=14" \
      "omegaconf>=2.3" "pyyaml>=6" "tqdm>=4.66" "matplotlib>=3.8" "tensorboard>=2.15" "aiohttp>=3.9"
COPY megatron_nft /opt/megatron-nft/megatron_nft
COPY checkpoints_tools /opt/megatron-nft/checkpoints_tools
COPY launch /opt/megatron-nft/launch
COPY recipes /opt/megatron-nft/recipes
RUN pip install -c /opt/base-constraints.txt --no-deps /opt/megatron-nft

# 3. SGLang pins its own torch (and CUDA 13 kernels): a separate environment, without the system
#    site-packages, so its resolver never touches the trainer's. Rollout nodes run
#    /opt/sglang/bin/python -m sglang.launch_server (launch/tasks.py); the two talk over HTTP/NCCL only.
#    Its CUDA 13 wheels need a host driver that supports CUDA 13.
RUN python -m venv /opt/sglang \
 && /opt/sglang/bin/pip install --upgrade pip \
 && /opt/sglang/bin/pip install "sglang==${SGLANG_VERSION}"

# 4. Smoke test at build time (no GPU here: imports that need one are checked when one is visible).
COPY docker /opt/megatron-nft/docker
RUN bash /opt/megatron-nft/docker/smoke.sh

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /workspace
