#!/usr/bin/env bash
# nkv_watch.sh: watch a key or keyspace in nkv and run a command on each change.
# Needs only bash, socat and jq. See usage() below, and docs/PROTOCOL.md for
# the events.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: nkv_watch.sh [-s SOCKET] PREFIX [--] [HOOK [ARG...]]

Subscribe to PREFIX in nkv (a key, which covers the key and every key below
it; "a.*" for only the keys below "a"; "*" for all keys), print one line per
event and, if HOOK is given, run it for each init (current value at start),
put and del event with these variables in its environment:

  EVENT       init, put or del
  KEY         the key that changed
  VALUE       the value: a JSON string as plain text, any other JSON value as
              JSON text; empty for del
  VALUE_JSON  the value as JSON text ("null" for del)
  REV         the revision of the change

The hook runs with no standard input; when it fails, a warning is printed and
watching goes on.

Options:
  -s SOCKET   the server's socket (default: $NKV_SOCKET or /tmp/nkv/nkv.sock)
  -h          show this help

Exit status: 0 when stopped by SIGINT or SIGTERM; 75 (try again later) when
the server is not running, shut down or the connection was lost, so that a
supervisor can restart the watcher; 1 on any other error (bad usage, a
refused subscription).

Examples:
  nkv_watch.sh app.config
  nkv_watch.sh app.config -- sh -c 'echo "$EVENT $KEY=$VALUE" >> /tmp/config.log'
  nkv_watch.sh -s /run/nkv.sock 'app.feature.*' systemctl reload app
EOF
}

die() { echo "nkv_watch: $*" >&2; exit 1; }

socket_path=${NKV_SOCKET:-/tmp/nkv/nkv.sock}
while getopts ':s:h' opt; do
    case $opt in
        s) socket_path=$OPTARG ;;
        h) usage; exit 0 ;;
        :) usage >&2; die "option -$OPTARG needs an argument" ;;
        *) usage >&2; die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
(($# >= 1)) || { usage >&2; exit 1; }
prefix=$1
shift
[[ ${1-} == -- ]] && shift
hook=("$@")

command -v socat >/dev/null || die "socat is not installed"
command -v jq >/dev/null || die "jq is not installed"
if [[ ! -S $socket_path ]]; then
    echo "nkv_watch: $socket_path is not a socket (is nkv-server running?)" >&2
    exit 75
fi

tmp=$(mktemp -d)
socat_pid=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    if [[ -n $socat_pid ]]; then kill "$socat_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# Requests go through a FIFO that this script keeps open for writing on fd 3
# for as long as it runs. socat therefore never reads end-of-file on its input,
# so it never half-closes the connection; a half-closed connection would end
# the subscription once the server has answered.
mkfifo "$tmp/requests"
exec 3<>"$tmp/requests"
# The JSON request form carries any key exactly; jq does the quoting.
jq -cn --arg key "$prefix" '{op: "sub", key: $key}' >&3
exec 4< <(exec socat - "UNIX-CONNECT:$socket_path" <"$tmp/requests")
socat_pid=$!

# The first line answers the SUB request.
if ! IFS= read -r line <&4; then
    echo "nkv_watch: the server closed the connection before answering" >&2
    exit 75
fi
if [[ $(jq -r '.ok' <<<"$line") != true ]]; then
    die "subscription refused: $(jq -r '"\(.error): \(.message)"' <<<"$line" 2>/dev/null || echo "$line")"
fi

while IFS= read -r line <&4; do
    # @sh quotes each field for the shell, so eval only ever assigns.
    fields=$(jq -r '@sh "EVENT=\(.event // "") KEY=\(.key // "") REV=\(.rev // "") COUNT=\(.count // "") VALUE_JSON=\(.value | tojson) VALUE=\(if .value == null then "" elif (.value | type) == "string" then .value else (.value | tojson) end)"' <<<"$line") \
        || { echo "nkv_watch: ignoring a line that is not JSON: $line" >&2; continue; }
    EVENT='' KEY='' REV='' COUNT='' VALUE='' VALUE_JSON=''
    eval "$fields"
    case $EVENT in
        init | put | del)
            if [[ $EVENT == del ]]; then
                printf '%s %s rev=%s\n' "$EVENT" "$KEY" "$REV"
            else
                printf '%s %s rev=%s %s\n' "$EVENT" "$KEY" "$REV" "$VALUE_JSON"
            fi
            if ((${#hook[@]} > 0)); then
                if ! (export EVENT KEY VALUE VALUE_JSON REV && "${hook[@]}" </dev/null); then
                    echo "nkv_watch: hook failed for $EVENT $KEY (rev $REV)" >&2
                fi
            fi
            ;;
        ready)
            echo "nkv_watch: snapshot of $prefix complete ($COUNT keys); watching" >&2
            ;;
        shutdown)
            echo "nkv_watch: the server is shutting down" >&2
            exit 75
            ;;
        *)
            echo "nkv_watch: unexpected line: $line" >&2
            ;;
    esac
done
echo "nkv_watch: the connection to $socket_path was lost" >&2
exit 75
