# syntax=docker/dockerfile:1
# Herald container image (BuildKit, the default builder of Docker ≥ 23):
#
#   docker build -t ghcr.io/herald-notify/herald:0.1.0 .
#
# The builder compiles the release binary on Debian bookworm; the runtime is
# distroless Debian 12 (glibc, CA certificates, no shell or package manager)
# running as the non-root user 65532. Herald writes nothing to disk, so the
# container runs with a read-only root filesystem.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------- builder
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /src

# Sources are bind-mounted (read-only, never copied into a layer), and the
# crate registry and target directory live in BuildKit cache mounts: a
# rebuild after a source change recompiles Herald only, not its ~300
# dependencies, and no source change invalidates a dependency download.
# (This also copes with any test/bench targets Cargo.toml declares, which a
# "compile dependencies against placeholder sources" layer would not.)
ENV CARGO_TARGET_DIR=/cargo-target
RUN --mount=type=bind,target=/src \
    --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git/db,sharing=locked \
    --mount=type=cache,target=/cargo-target,id=herald-target,sharing=locked \
    cargo build --release --locked --bin herald \
 && install -D -m 0755 /cargo-target/release/herald /out/herald

# ---------------------------------------------------------------- runtime
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="gRPC streaming notification service on PostgreSQL LISTEN/NOTIFY" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/herald /usr/local/bin/herald

# Listen on all interfaces inside the container (Herald's own default is
# loopback). gRPC and grpc-web share 50051; Prometheus metrics on 9090.
ENV HERALD_LISTEN=0.0.0.0:50051 \
    HERALD_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 50051 9090

# distroless "nonroot" is UID/GID 65532; numeric, so that Kubernetes can
# verify runAsNonRoot.
USER 65532:65532

ENTRYPOINT ["herald"]
CMD ["serve"]
