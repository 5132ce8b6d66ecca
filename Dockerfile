# impala images. Three targets:
#
#   docker build -t impala:cpu .                      the default (last stage): impala on CPU
#   docker build -t impala:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#                                                     the same with CUDA torch (run with --gpus all)
#   docker build --target dmlab -t impala:dmlab .     DeepMind Lab built from source with bazel,
#                                                     impala installed on top (as the original's
#                                                     Dockerfile did); needs ~10 GB and ~30 min
#
# Every image runs `python -m impala.experiment` with its arguments as flags, from the
# source tree (configs/ is there), e.g.
#   docker run --rm impala:cpu --flagfile=configs/cartpole.cfg --logdir=/logs/cartpole
#   docker run --rm -v $PWD/logs:/logs impala:dmlab --level_name=dmlab30 --logdir=/logs/dmlab30
# docs/dmlab.md has more on the dmlab image.

# The OS image under every stage. Ubuntu 22.04 by default; the CUDA runtime images of the
# same release work unchanged (they add CUDA libraries, Python comes from apt either way).
ARG BASE_IMAGE=ubuntu:22.04
# The DeepMind Lab revision the dmlab target builds: a commit, never a branch (its last
# one, of 2023-01-04; docs/dmlab.md).
ARG DMLAB_REF=b1db91af5b4d2f3a24466f4632a3e5e1b0829cca

# ----------------------------------------------------------------------------------------
# base: Python in a virtual environment, torch pinned (CPU wheel unless TORCH_INDEX_URL
# says otherwise), and impala's other dependencies. Shared by all targets.
FROM ${BASE_IMAGE} AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip setuptools wheel
# torch first, from its own index: an unpinned torch from PyPI pulls the CUDA build (GBs).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /opt/impala
# Dependencies before the source, so that editing the code does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir impala && touch impala/__init__.py \
    && pip install . && pip uninstall -y impala \
    && rm -rf impala build *.egg-info

# ----------------------------------------------------------------------------------------
# dmlab-build: DeepMind Lab's Python module built from source with bazel
# (https://github.com/google-deepmind/lab, docs/users/build.md and
# python/pip_package/README.md), into a wheel in /dmlab_pkg.
FROM base AS dmlab-build
# DMLAB_REF (top of file) and the bazel release that builds it. docker/dmlab/WORKSPACE
# replaces DMLab's own, which fetched its dependencies at moving heads; change the three
# together (docs/dmlab.md).
ARG DMLAB_REF
ARG BAZEL_VERSION=6.5.0
ARG BAZELISK_VERSION=v1.20.0
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       build-essential curl git zip unzip pkg-config libffi-dev gettext \
       freeglut3-dev libsdl2-dev libosmesa6-dev libjpeg-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/* \
    && curl -fsSL -o /usr/local/bin/bazel \
       "https://github.com/bazelbuild/bazelisk/releases/download/${BAZELISK_VERSION}/bazelisk-linux-amd64" \
    && chmod +x /usr/local/bin/bazel
ENV USE_BAZEL_VERSION=${BAZEL_VERSION}
# Exactly DMLAB_REF: fetched by commit id (GitHub serves any commit), then checked.
RUN git init -q /lab && cd /lab \
    && git fetch -q --depth 1 https://github.com/google-deepmind/lab.git "${DMLAB_REF}" \
    && git checkout -q FETCH_HEAD \
    && test "$(git log -1 --format=%H)" = "${DMLAB_REF}"
COPY docker/dmlab/WORKSPACE /lab/WORKSPACE
# DMLab's C extension uses the NumPy 1 C API: build and run it against NumPy 1.26. Its
# bazel rules find Python and NumPy by running `python3`, which is the venv's here, so
# the module matches the interpreter and NumPy it will run with.
RUN pip install "numpy>=1.24,<2" \
    && cd /lab \
    && bazel build -c opt --python_version=PY3 //python/pip_package:build_pip_package \
    && PYTHON_BIN_PATH="$(command -v python3)" ./bazel-bin/python/pip_package/build_pip_package /dmlab_pkg \
    && bazel clean --expunge

# ----------------------------------------------------------------------------------------
# dmlab: impala with DeepMind Lab. Only the runtime libraries of the engine, the wheel
# and impala; bazel and the build tree stay behind in dmlab-build.
FROM base AS dmlab
ARG DMLAB_REF
# Set to 1 to download the brady_konkle_oliva2008 images that the psychlab_* levels of
# DMLab-30 need (as the original's Dockerfile did; several GB from their hosts); then run
# with --dataset_path=/opt/brady_konkle_oliva2008.
ARG DMLAB_DATASET=0
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       libosmesa6 libegl1 libgl1 libsdl2-2.0-0 libffi8 libjpeg-turbo8 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=dmlab-build /dmlab_pkg /tmp/dmlab_pkg
RUN pip install "numpy>=1.24,<2" /tmp/dmlab_pkg/*.whl && rm -rf /tmp/dmlab_pkg \
    && python -c "import deepmind_lab"
RUN if [ "${DMLAB_DATASET}" = "1" ]; then \
      pip install Pillow && mkdir -p /opt/brady_konkle_oliva2008 && cd /opt/brady_konkle_oliva2008 \
      && curl -fsSL "https://raw.githubusercontent.com/google-deepmind/lab/${DMLAB_REF}/data/brady_konkle_oliva2008/README.md" \
         | tr '\n' '\r' | sed -e 's/.*```sh\(.*\)```.*/\1/' | tr '\r' '\n' | bash; \
    fi
COPY . .
# numpy stays below 2 for the engine's module (pip would otherwise upgrade it).
RUN pip install "numpy>=1.24,<2" . \
    && python -c "import impala.envs.dmlab as d; d.import_engine()"
ENTRYPOINT ["python", "-m", "impala.experiment"]
CMD ["--helpshort"]

# ----------------------------------------------------------------------------------------
# cpu (the default target, and what compose.yaml runs): impala on the base image.
FROM base AS cpu
COPY . .
RUN pip install --no-deps . && python -c "import impala.experiment"
ENTRYPOINT ["python", "-m", "impala.experiment"]
CMD ["--helpshort"]
