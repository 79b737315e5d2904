# megatron-nft for GPU clusters: NVIDIA's PyTorch image (CUDA, cuDNN, NCCL, Transformer Engine and apex,
# all built against the image's own torch) + the locked trainer stack (docker/requirements.lock), this
# package, and SGLang in a virtual environment of its own.
#
#   docker build -t megatron-nft:0.1.0 .
#   enroot import -o megatron-nft.sqsh dockerd://megatron-nft:0.1.0     # for Slurm + pyxis (cluster.container_image)
#   docker run --gpus all --rm megatron-nft:0.1.0 bash /opt/megatron-nft/docker/smoke.sh   # full check on a GPU
#
# Everything is installed at build time; a running container needs no network (HF_HUB_OFFLINE=1: models
# come from a mount, cluster.models_dir).

# megatron-core 0.19 needs Python >= 3.12: NGC PyTorch 25.01 and later (Ubuntu 24.04) ship it.
# The base is pinned by digest (a tag can be re-pushed; a digest names one image). nvcr.io was not
# reachable where this was written, so the digest comes from public sources, found 2026-11-30 by code
# search: four files in three unrelated projects pin nvcr.io/nvidia/pytorch:25.10-py3 to this same
# digest (among them cmooreio/comfyui-thor's Dockerfile, and a DGX Spark environment note that records
# checking it against the pulled tag), none to another. Those sources ran it on arm64 (DGX Spark,
# Jetson Thor); as a pulled tag's repo digest it names the tag's multi-platform index, which serves
# x86-64 too. Not verified from here: `docker buildx imagetools inspect nvcr.io/nvidia/pytorch:25.10-py3`
# prints the index digest; another base: --build-arg BASE_IMAGE=<image>@sha256:<digest>. The build
# writes the base it used to /opt/megatron-nft/base-image.txt, beside versions.txt (pip freeze).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3@sha256:42263b2424fc237b34c4fc4a91c30d603c57eed36e37d31ff6d9a4f1f801edee
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
# The trainer's versions are in docker/requirements.lock (tests/test_docker.py checks them against
# pyproject.toml and the CPU test environment); SGLang's is the one its stand-ins were checked against.
ARG SGLANG_VERSION=0.5.23

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# 0. The Slurm scripts run pkill (procps) in the container: NGC's images have it; a base without it
#    (found by building on a minimal Debian stand-in, scripts/build-image-here) gets it from apt.
RUN command -v pkill > /dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends procps \
      && rm -rf /var/lib/apt/lists/*; }

# 1. What the base image built together stays: NGC PyTorch images (25.03 and later) pin every package
#    they ship (torch, Transformer Engine, apex, flash-attn, numpy, ...) in a pip constraints file that
#    every pip in the image obeys (PIP_CONSTRAINT or the global pip configuration). The trainer's
#    packages are installed under it; a PyPI torch would break the compiled extensions.
RUN python -c "import sys; assert sys.version_info >= (3, 12), 'megatron-core 0.19 needs Python >= 3.12; base image has ' + sys.version" \
 && constraints="${PIP_CONSTRAINT:-$(pip config get global.constraint 2>/dev/null || true)}" \
 && if [ ! -f "${constraints}" ]; then echo "Dockerfile: the base image ${BASE_IMAGE} has no pip constraints file (NGC PyTorch 25.03 or later expected)" >&2; exit 1; fi \
 && ln -sf "${constraints}" /opt/base-image-constraints.txt \
 && grep -iE '^(torch|transformer[-_]engine|flash[-_]attn|apex|numpy)[=<>]' /opt/base-image-constraints.txt || true

# 2. The trainer and the launcher, against the base image's torch: the lock file (the versions the
#    CPU tests ran) less what the image pins otherwise (lock_filter names each such line). Dependencies
#    first (a layer that survives code edits), then the package itself without dependencies.
COPY pyproject.toml README.md /opt/megatron-nft/
COPY docker/requirements.lock docker/lock_filter.py /opt/megatron-nft/docker/
RUN python /opt/megatron-nft/docker/lock_filter.py /opt/megatron-nft/docker/requirements.lock \
      /opt/base-image-constraints.txt > /tmp/trainer-requirements.txt \
 && pip install -r /tmp/trainer-requirements.txt \
 && pip list --format=freeze > /opt/megatron-nft/versions.txt \
 && echo "${BASE_IMAGE}" > /opt/megatron-nft/base-image.txt
COPY megatron_nft /opt/megatron-nft/megatron_nft
COPY checkpoints_tools /opt/megatron-nft/checkpoints_tools
COPY launch /opt/megatron-nft/launch
COPY recipes /opt/megatron-nft/recipes
RUN pip install --no-deps /opt/megatron-nft

# 3. SGLang pins its own torch (and CUDA 13 kernels): a separate environment without the system
#    site-packages. NGC's constraints reach every pip in the image, this venv's too (its torch pin
#    makes SGLang's requirements unsatisfiable), so this pip runs without them: PIP_CONSTRAINT unset
#    and no pip configuration file read (tests/test_docker.py resolves this very command under an
#    NGC-like constraint). Rollout nodes run /opt/sglang/bin/python -m sglang.launch_server.
#    NCCL: SGLang's torch brings its own libnccl wheel, and NCCL peers must run one version, so the
#    venv gets the NCCL release the trainer's torch was built with (the nccl weight transport between
#    trainer and servers needs it) when SGLang's torch still loads with it (a torch built against a
#    newer NCCL may need its symbols); otherwise the mismatch is recorded and smoke.sh says so (the
#    default disk transport needs no shared NCCL). Its CUDA 13 wheels need a host driver with CUDA 13.
#    WITH_SGLANG=0 leaves SGLang out (a build of the other layers where SGLang's wheels cannot be had,
#    scripts/build-image-here --no-sglang; smoke.sh then says it checked no SGLang).
ARG WITH_SGLANG=1
RUN if [ "${WITH_SGLANG}" = 0 ]; then mkdir -p /opt/sglang && echo "built with WITH_SGLANG=0" > /opt/sglang/NOT_INSTALLED; exit 0; fi \
 && python -m venv /opt/sglang \
 && SGLANG_PIP="env -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null /opt/sglang/bin/pip" \
 && ${SGLANG_PIP} install --upgrade pip \
 && ${SGLANG_PIP} install "sglang==${SGLANG_VERSION}" \
 && NCCL_VERSION=$(python -c "import torch; print('.'.join(map(str, torch.cuda.nccl.version())))") \
 && NCCL_WHEEL=$(/opt/sglang/bin/pip list --format=freeze | sed -n 's/^\(nvidia-nccl-cu[0-9]*==.*\)/\1/p') \
 && if [ -n "${NCCL_WHEEL}" ] && ${SGLANG_PIP} install --no-deps "${NCCL_WHEEL%%==*}==${NCCL_VERSION}" \
      && /opt/sglang/bin/python -c "import torch.distributed"; then \
      echo "SGLang venv: NCCL ${NCCL_VERSION}, the trainer's"; \
    else \
      echo "SGLang venv: cannot run the trainer's NCCL ${NCCL_VERSION}; keeping ${NCCL_WHEEL} (weight_transport=nccl unusable, disk works)" \
        | tee /opt/sglang/NCCL_MISMATCH; \
      ${SGLANG_PIP} install --no-deps "${NCCL_WHEEL}"; \
    fi

# 4. Smoke test at build time (no GPU here: imports that need one are checked when one is visible).
COPY docker /opt/megatron-nft/docker
RUN bash /opt/megatron-nft/docker/smoke.sh

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /workspace
