# Prefect process worker that runs imtok's stages, on CPU or on NVIDIA GPUs.
# Build context: the repository root (see docker-compose.yml).
#
# The PyTorch wheels in requirements.lock are CUDA 13 builds that bring their own CUDA libraries,
# so the base image only supplies the NVIDIA container settings (and refuses to start on a driver
# older than CUDA 13.0 needs). Python 3.11 is a standalone build installed by uv.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates git \
 && rm -rf /var/lib/apt/lists/*

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
RUN uv venv --seed --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

WORKDIR /opt/imtok

# The lock is complete: nothing is resolved at install time (same steps as `make`).
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock \
 && pip check

COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

CMD ["prefect", "worker", "start", "--pool", "cpu", "--type", "process"]
