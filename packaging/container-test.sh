#!/usr/bin/env bash
# Build an image of host-built binaries and check, with podman, offline:
#   - the server runs as the image's unprivileged user (65532:65532) and its
#     HEALTHCHECK passes;
#   - a client in a second container, as another user in the server's group,
#     reaches the server through the mounted directory, also after the server
#     container restarted (a new socket inode);
#   - `podman stop` (SIGTERM) ends the server with exit status 0 and removes
#     the socket.
#
# Dockerfile builds inside a rust image, which cannot be fetched offline; this
# builds the same final stage (packaging/Containerfile.host: FROM scratch, the
# same USER, ENV, VOLUME, HEALTHCHECK, STOPSIGNAL, ENTRYPOINT) from statically
# linked binaries built here.
#
# Needs podman and runc (apt-get install podman runc). runc, because crun 1.8
# (Debian 12) fails in this kind of machine with "crun: setrlimit
# `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied" and, with
# --ulimit set, "crun: cgroups in hybrid mode not supported, drop all
# controllers from cgroupv2". Root is needed for the volume's ownership.
set -euo pipefail

fail() { echo "container-test: FAIL: $*" >&2; exit 1; }
step() { echo "container-test: $*"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
for tool in podman runc; do
    command -v "$tool" >/dev/null || fail "$tool not found (apt-get install podman runc)"
done
[[ $(id -u) == 0 ]] || fail "needs root (the volume is chowned to the image's user)"

host=$(rustc -vV | sed -n 's/^host: //p')
step "building static binaries for $host"
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --locked --bins --target "$host" --target-dir target/static
bin=target/static/$host/debug

work=$(mktemp -d)
tag=localhost/nkv-test:$$
server=nkv-test-server-$$
run=(podman --runtime runc run --network=none --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
cleanup() {
    podman rm -f "$server" >/dev/null 2>&1 || true
    podman rmi -f "$tag" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

cp "$bin/nkv-server" "$bin/nkv-client" packaging/Containerfile.host "$work/"
mkdir -p "$work/tmp/nkv"
step "building the image $tag (FROM scratch, offline)"
# Docker format: the OCI format has no HEALTHCHECK.
podman build --quiet --format docker -t "$tag" -f "$work/Containerfile.host" "$work" >/dev/null

volume=$work/volume
mkdir -p "$volume"
chown 65532:65532 "$volume"
chmod 0750 "$volume"
step "starting the server container"
"${run[@]}" -d --name "$server" -v "$volume:/tmp/nkv" "$tag" >/dev/null
client() {
    "${run[@]}" --rm --user 1000:65532 -v "$volume:/tmp/nkv" \
        --entrypoint /usr/bin/nkv-client "$tag" --timeout 10 "$@"
}
for _ in $(seq 100); do
    [[ -S $volume/nkv.sock ]] && break
    sleep 0.1
done
[[ -S $volume/nkv.sock ]] || fail "no socket in the volume; log: $(podman logs "$server" 2>&1)"
[[ $(stat -c %u "$volume/nkv.sock") == 65532 ]] || fail "the server does not run as 65532"

step "a client in a second container, as uid 1000 in group 65532"
client put container.k from-another-container
[[ $(client get container.k) == from-another-container ]] || fail "the client's put was not read back"
podman healthcheck run "$server" || fail "the HEALTHCHECK failed"

step "restarting the server container: the directory mount follows the new socket"
podman restart --time 10 "$server" >/dev/null
for _ in $(seq 100); do
    client health >/dev/null 2>&1 && break
    sleep 0.1
done
[[ $(client get container.k) == from-another-container ]] || fail "not reachable after a restart"

step "podman stop: SIGTERM, exit status 0, socket removed"
podman stop --time 10 "$server" >/dev/null
status=$(podman inspect -f '{{.State.ExitCode}}' "$server")
[[ $status == 0 ]] || fail "the server exited with $status; log: $(podman logs "$server" 2>&1)"
[[ ! -e $volume/nkv.sock ]] || fail "the socket was left behind"
step "ok"
