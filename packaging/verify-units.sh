#!/usr/bin/env bash
# Check the systemd units and tmpfiles.d entry in systemd/ without a running
# systemd (works in CI and containers).
#
# What it checks, failing (exit 1) on the first broken check:
#   1. `systemd-analyze verify` accepts nkv.service and nkv.socket, and prints
#      no warning about them (unknown keys and sections are only warnings to
#      systemd, but they are typos to us). ExecStart= must name an existing
#      executable, so the units are copied to a temporary directory with
#      /usr/bin/nkv-server replaced by a real binary: $NKV_SERVER_BIN, else
#      /usr/bin/nkv-server if installed, else <repo>/target/debug/nkv-server
#      (build it first with `cargo build`).
#   2. `systemd-analyze security --offline=true` rates nkv.service's exposure
#      at or below $NKV_MAX_EXPOSURE (0-100 scale, default 25, shown as 2.5).
#   3. Project rules that systemd cannot know: Type=notify; no PrivateTmp=yes
#      (the socket is in /tmp/nkv and must be shared); /tmp/nkv writable; the
#      socket unit listens on the server's default path and names nkv.service;
#      the environment file is optional (EnvironmentFile=-...).
#   4. systemd-tmpfiles accepts systemd/nkv.tmpfile and creates /tmp/nkv under
#      a scratch --root.
#   5. packaging/default/nkv (/etc/default/nkv) documents exactly the
#      environment variables that `nkv-server --help` lists, plus RUST_LOG and
#      NKV_ARGS, and the server starts with every documented default set.
#
# Usage: packaging/verify-units.sh        (from anywhere inside the repo)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
units="$repo/systemd"
max_exposure=${NKV_MAX_EXPOSURE:-25}

fail() { echo "verify-units: FAIL: $*" >&2; exit 1; }
pass() { echo "verify-units: ok: $*"; }

command -v systemd-analyze >/dev/null || fail "systemd-analyze not found (apt-get install systemd)"

bin=${NKV_SERVER_BIN:-}
if [[ -z $bin ]]; then
    if [[ -x /usr/bin/nkv-server ]]; then bin=/usr/bin/nkv-server
    else bin="$repo/target/debug/nkv-server"; fi
fi
[[ -x $bin ]] || fail "server binary $bin not found or not executable; run 'cargo build' or set NKV_SERVER_BIN"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#^ExecStart=/usr/bin/nkv-server#ExecStart=$bin#" "$units/nkv.service" >"$tmp/nkv.service"
cp "$units/nkv.socket" "$tmp/nkv.socket"
grep -q "^ExecStart=$bin " "$tmp/nkv.service" || fail "nkv.service: ExecStart= is not /usr/bin/nkv-server \$NKV_ARGS"

# 1. systemd-analyze verify
if ! systemd-analyze verify "$tmp/nkv.service" "$tmp/nkv.socket" >"$tmp/verify.log" 2>&1; then
    cat "$tmp/verify.log" >&2
    fail "systemd-analyze verify rejected the units"
fi
if grep -E "nkv\.(service|socket)" "$tmp/verify.log" >&2; then
    fail "systemd-analyze verify warned about the units (above)"
fi
pass "systemd-analyze verify nkv.service nkv.socket (ExecStart=$bin)"

# 2. exposure score
if ! systemd-analyze security --offline=true --threshold="$max_exposure" --no-pager \
        "$tmp/nkv.service" >"$tmp/security.log" 2>&1; then
    grep -E '✗|Overall|rror' "$tmp/security.log" >&2 || cat "$tmp/security.log" >&2
    fail "nkv.service exposure is above $max_exposure/100"
fi
pass "$(grep -o 'Overall exposure level.*' "$tmp/security.log" || echo "exposure <= $max_exposure/100")"

# 3. project rules
svc="$units/nkv.service"
sock="$units/nkv.socket"
has() { grep -Eq "^$2\$" "$1" || fail "$(basename "$1"): missing '$2'"; }
has "$svc" 'Type=notify'
has "$svc" 'EnvironmentFile=-/etc/default/nkv'
has "$svc" 'Restart=on-failure'
has "$svc" 'ReadWritePaths=.*/tmp/nkv( .*)?'
has "$svc" 'ProtectSystem=strict'
if grep -Eiq '^PrivateTmp=(yes|true|on|1)' "$svc"; then
    fail "nkv.service: PrivateTmp=yes hides /tmp/nkv/nkv.sock from every other service"
fi
has "$sock" 'ListenStream=/tmp/nkv/nkv.sock'
has "$sock" 'Service=nkv.service'
has "$sock" 'SocketMode=0660'
pass "project rules (Type=notify, no PrivateTmp, /tmp/nkv writable, socket path)"

# 4. tmpfiles.d entry
if command -v systemd-tmpfiles >/dev/null; then
    mkdir -p "$tmp/root/tmp"
    systemd-tmpfiles --root="$tmp/root" --create "$units/nkv.tmpfile" >"$tmp/tmpfiles.log" 2>&1 \
        || { cat "$tmp/tmpfiles.log" >&2; fail "systemd-tmpfiles rejected nkv.tmpfile"; }
    [[ -d $tmp/root/tmp/nkv ]] || fail "nkv.tmpfile did not create /tmp/nkv"
    if [[ -s $tmp/tmpfiles.log ]]; then cat "$tmp/tmpfiles.log" >&2; fail "systemd-tmpfiles warned about nkv.tmpfile"; fi
    pass "systemd-tmpfiles --create nkv.tmpfile"
else
    echo "verify-units: skip: systemd-tmpfiles not found" >&2
fi

# 5. the environment file matches the server's flags
defaults="$repo/packaging/default/nkv"
[[ -f $defaults ]] || fail "$defaults is missing"
"$bin" --help >"$tmp/help.txt" 2>&1 || fail "$bin --help failed"
grep -o 'env: [A-Z_]*' "$tmp/help.txt" | cut -d' ' -f2 | sort -u >"$tmp/server-vars"
[[ -s $tmp/server-vars ]] || fail "$bin --help names no environment variables"
sed -n 's/^#\{0,1\}\([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$defaults" | sort -u >"$tmp/file-vars"
printf '%s\n' NKV_ARGS RUST_LOG >>"$tmp/server-vars"
sort -u -o "$tmp/server-vars" "$tmp/server-vars"
if ! diff -u "$tmp/server-vars" "$tmp/file-vars" >"$tmp/vars.diff"; then
    cat "$tmp/vars.diff" >&2
    fail "packaging/default/nkv and \`nkv-server --help\` disagree on the variables (- server only, + file only)"
fi
# Every documented default, uncommented (NKV_SOCKET_GROUP names a group that
# need not exist here, and NKV_SOCKET/NKV_DATA_DIR point into a scratch dir).
(
    set -a
    # shellcheck disable=SC1090
    . <(sed -n 's/^#\{0,1\}\([A-Z_][A-Z0-9_]*=.*\)/\1/p' "$defaults" | grep -v '^NKV_SOCKET_GROUP=')
    set +a
    export NKV_SOCKET="$tmp/run/nkv.sock" NKV_DATA_DIR="$tmp/run/data"
    exec "$bin" >"$tmp/defaults.log" 2>&1
) &
server_pid=$!
for _ in $(seq 200); do
    [[ -S $tmp/run/nkv.sock ]] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.05  # poll, bounded: 200 x 50 ms
done
if [[ ! -S $tmp/run/nkv.sock ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    cat "$tmp/defaults.log" >&2
    fail "nkv-server did not start with the defaults of packaging/default/nkv"
fi
kill -TERM "$server_pid"
wait "$server_pid" || fail "nkv-server exited with status $? on SIGTERM"
pass "packaging/default/nkv matches nkv-server --help ($(wc -l <"$tmp/file-vars") variables) and its defaults start the server"

echo "verify-units: all checks passed"
