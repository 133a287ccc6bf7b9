# syntax=docker/dockerfile:1
# The image the Helm chart in k8s/ runs: `cpumesh` (shard, tokenizer or router by its arguments).
#
#   docker build -t cpumesh/cpumesh:0.1.0 .
#
# Two stages: `build` resolves nothing (every version is pinned in k8s/image/*.lock, written by
# k8s/image/lock.py from the virtualenv the tests ran in), generates the gRPC code and installs the
# project into /opt/cpumesh; the runtime stage copies only that virtualenv and runs as user 10001.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch is pinned to a CPU-only build ("+cpu"), published on PyTorch's CPU wheel index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/cpumesh
ENV PATH=/opt/cpumesh/bin:$PATH
WORKDIR /src

# Locked dependencies first: this layer is rebuilt only when a lock changes.
COPY k8s/image/requirements.lock k8s/image/build.lock /src/
RUN pip install --no-deps --extra-index-url "$TORCH_INDEX_URL" -r requirements.lock \
 && pip install --no-deps --target /opt/buildtools -r build.lock

COPY pyproject.toml README.md /src/
COPY protos/ /src/protos/
COPY services/ /src/services/
COPY model_formats/ /src/model_formats/
COPY tools/ /src/tools/
COPY tokenizer_svc/ /src/tokenizer_svc/
COPY router_svc/ /src/router_svc/
COPY shard_svc/ /src/shard_svc/
# Generated gRPC code is never committed: build it here with the build-only tools, then install
# the project without resolving anything (all its dependencies are already there).
RUN PYTHONPATH=/opt/buildtools PATH=/opt/buildtools/bin:$PATH python -m services.protogen --force \
 && pip install --no-deps --no-build-isolation /src \
 && site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && cp -n services/pb/PROTOS_SHA256 "$site/services/pb/" \
 && pip check \
 && cpumesh --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
# A C++ compiler: a shard builds cpumesh's kernels (shard_svc/csrc) at start for its node's CPU
# (AVX2 or AVX-512), and inductor compiles `--compile decode` steps with it. Without one, both
# fall back to plain torch paths (logged), several times slower.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 cpumesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --shell /usr/sbin/nologin cpumesh
COPY --from=build /opt/cpumesh /opt/cpumesh
ENV PATH=/opt/cpumesh/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 50052 5555 8000
ENTRYPOINT ["cpumesh"]
CMD ["--help"]
