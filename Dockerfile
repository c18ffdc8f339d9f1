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
# The musl target of the build machine's own architecture (x86_64, aarch64, ...): with
# `docker buildx build --platform linux/arm64` the build stage runs as arm64 and builds for
# it. Set TARGET to cross-compile instead.
ARG TARGET=
# musl-tools only provides the musl C toolchain; its version does not matter.
# hadolint ignore=DL3008
RUN target="${TARGET:-$(rustc -vV | sed -n 's/^host: //p' | sed 's/-gnu$/-musl/')}" \
    && echo "$target" > /target \
    && rustup target add "$target" \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# The caches speed up rebuilds; the binaries are copied out of the cached
# target directory in the same step. /out/tmp/nkv becomes the volume, owned by
# the user the server runs as.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(cat /target)" \
    && cargo build --release --locked --target "$target" --bin nkv-server --bin nkv-client \
    && mkdir -p /out/bin /out/tmp/nkv \
    && cp "target/$target/release/nkv-server" "target/$target/release/nkv-client" /out/bin/ \
    && chown 65532:65532 /out/tmp/nkv && chmod 0750 /out/tmp/nkv

FROM scratch
COPY --from=build /out/bin/nkv-server /out/bin/nkv-client /usr/bin/
COPY --from=build /out/tmp /tmp
# Not root: an unprivileged uid and gid (the image has no /etc/passwd, so
# numbers). A new named volume takes the ownership of /tmp/nkv from the image;
# a bind-mounted host directory must be writable by 65532. Clients in other
# containers connect as a member of group 65532 (the socket is 0660), e.g.
# `--user 1000:65532` or `group_add: ["65532"]`; or set NKV_SOCKET_MODE=0666.
USER 65532:65532
# The server's defaults, spelled out; override with -e or in compose. The
# image has no /etc/group, so NKV_SOCKET_GROUP must be a number here.
ENV NKV_SOCKET=/tmp/nkv/nkv.sock \
    NKV_DATA_DIR=/tmp/nkv/data \
    RUST_LOG=info
# The socket and the data live in this volume; share it with the clients.
VOLUME /tmp/nkv
# Healthy while the server answers HEALTH on its socket within 2 s.
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/bin/nkv-client", "--timeout", "2", "health"]
# SIGTERM (docker stop): the server finishes in-flight requests, tells
# subscribers, removes the socket and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/nkv-server"]
