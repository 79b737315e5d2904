# A stand-in for NVIDIA's PyTorch base image, for building the image's layers where nvcr.io cannot be
# reached (scripts/build-image-here): a Debian root filesystem (debootstrap) with Python >= 3.12, a
# torch from PyPI, and what makes an NGC image different for the Dockerfile: a pip constraints file that
# pins the image's torch and numpy and that every pip obeys (PIP_CONSTRAINT, as NGC PyTorch 25.03+).
ARG DEBIAN_IMAGE=megatron-nft/debian-python:trixie
FROM ${DEBIAN_IMAGE}
ARG TORCH_VERSION
ARG NUMPY_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# This machine's extra certificate authorities (a proxy's), if any: the stand-in runs where it is built.
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates > /dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /usr/local/ngc-like \
 && /usr/local/ngc-like/bin/pip install --quiet "torch==${TORCH_VERSION}" "numpy==${NUMPY_VERSION}" \
 && mkdir -p /etc/pip \
 && /usr/local/ngc-like/bin/pip list --format=freeze | grep -iE '^(torch|numpy|nvidia-nccl-cu[0-9]+)==' > /etc/pip/constraint.txt \
 && cat /etc/pip/constraint.txt
# Transformer Engine is NGC's own build against its torch: not here, and docker/smoke.sh is told so
ENV PATH=/usr/local/ngc-like/bin:${PATH} \
    PIP_CONSTRAINT=/etc/pip/constraint.txt \
    BASE_WITHOUT_TRANSFORMER_ENGINE=1
