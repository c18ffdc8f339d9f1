# syntax=docker/dockerfile:1
#
# nkv in a container: a static (musl) build, on an empty base image.
#
#   docker build -t nkv .
#   docker run -d --name nkv -v nkv-run:/tmp/nkv nkv
#
# Clients in other containers mount the same volume at /tmp/nkv and connect to
# /tmp/nkv/nkv.sock; see packaging/docker-compose.yml. Mount the *directory*,
# never the socket file alone: the server creates a new socket (a new inode)
# each time it starts, and a bind mount of the old file would keep pointing at
# the dead one.
#
# Keep target/ and .git out of the build context with a .dockerignore.

ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS build
ARG TARGET=x86_64-unknown-linux-musl
# musl-tools only provides the musl C toolchain; its version does not matter.
# hadolint ignore=DL3008
RUN rustup target add "${TARGET}" \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# The caches speed up rebuilds; the binaries are copied out of the cached
# target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target "${TARGET}" --bin nkv-server --bin nkv-client \
    && mkdir -p /out \
    && cp "target/${TARGET}/release/nkv-server" "target/${TARGET}/release/nkv-client" /out/

FROM scratch
COPY --from=build /out/nkv-server /out/nkv-client /usr/bin/
# The server's defaults, spelled out; override with -e or in compose. The
# image has no /etc/group, so NKV_SOCKET_GROUP must be a number here.
ENV NKV_SOCKET=/tmp/nkv/nkv.sock \
    NKV_DATA_DIR=/tmp/nkv/data \
    RUST_LOG=info
# The socket and the data live in this volume; share it with the clients.
VOLUME /tmp/nkv
# SIGTERM (docker stop): the server finishes in-flight requests, tells
# subscribers, removes the socket and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/nkv-server"]
