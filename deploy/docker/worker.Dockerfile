# syntax=docker/dockerfile:1.7
# cvdist worker image: `cvdist-worker` plus the torch wheel's shared libraries (libtorch,
# the CUDA runtime libs, cuDNN, NCCL). The GPU node provides only the NVIDIA driver
# (libcuda, injected by the NVIDIA container toolkit / device plugin).
#
#   docker build -f deploy/docker/worker.Dockerfile -t REGISTRY/cvdist-worker:TAG .
#
# Build context: the repository root (BuildKit reads worker.Dockerfile.dockerignore).
# The build stage is byte-for-byte the one in coordinator.Dockerfile (tests/deploy checks it).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- build (same in both Dockerfiles) ---------------------------------------------------
FROM ${RUST_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# g++ compiles tch's C++ shim; python3-venv hosts the torch wheel that provides libtorch.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates g++ python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# Same path in the build and runtime stages: cvdist-worker carries an rpath into it.
ENV CVDIST_TORCH_VENV=/opt/cvdist/torch-venv
WORKDIR /src
# The venv (~4.7 GB) gets its own layer, rebuilt only when the setup script changes.
COPY scripts/setup-libtorch.sh scripts/env.sh scripts/
RUN --mount=type=cache,target=/root/.cache/pip scripts/setup-libtorch.sh
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=cvdist-target \
    scripts/build.sh \
 && install -D -m 0755 target/release/cvdist /out/bin/cvdist \
 && install -D -m 0755 target/release/cvdist-worker /out/bin/cvdist-worker \
 && site="$(echo "$CVDIST_TORCH_VENV"/lib/python3.*/site-packages)" \
 && dest="/out/torch-venv/${site#"$CVDIST_TORCH_VENV"/}" \
 && mkdir -p "$dest/torch" \
 && cp -a "$site/torch/lib" "$dest/torch/lib" \
 && cp -a "$site/nvidia" "$dest/nvidia"
# ---- end of build stage ----------------------------------------------------------------

FROM ${RUNTIME_IMAGE} AS runtime
# tini reaps children and forwards SIGTERM; tar is what `kubectl cp` runs in the container.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini tar \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cvdist \
 && useradd --system --uid 10001 --gid cvdist --home-dir /var/cache/cvdist --shell /usr/sbin/nologin cvdist \
 && install -d -o cvdist -g cvdist -m 0750 /var/cache/cvdist
ENV CVDIST_TORCH_VENV=/opt/cvdist/torch-venv \
    CVDIST_CACHE_DIR=/var/cache/cvdist \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Only the shared libraries, at the venv-relative paths baked into the binary's rpath
# (torch/lib) and into libtorch's own rpath ($ORIGIN/../../nvidia/*/lib).
COPY --from=build /out/torch-venv/ /opt/cvdist/torch-venv/
COPY --from=build /out/bin/cvdist-worker /usr/local/bin/cvdist-worker
# Fails the build if any library is unresolved (libcuda is loaded lazily, not linked).
RUN ldd /usr/local/bin/cvdist-worker >/tmp/ldd.txt \
 && if grep 'not found' /tmp/ldd.txt; then exit 1; fi \
 && rm /tmp/ldd.txt \
 && cvdist-worker --help >/dev/null
USER 10001:10001
WORKDIR /var/cache/cvdist
EXPOSE 29500
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cvdist-worker"]
CMD ["worker"]
