#!/usr/bin/env bash
# Build the nkv .deb with cargo-deb, check its contents, install it and run
# the installed server.
#
# Needs the [package.metadata.deb] table of packaging/deb-metadata.toml in
# Cargo.toml, root (for dpkg -i) and dpkg. Installs cargo-deb if missing.
# Checks, failing (non-zero exit) on the first that breaks:
#   - `dpkg-deb -c` lists every expected path (binaries, units, tmpfiles.d
#     entry, /etc/default/nkv, docs, both man pages, bash/zsh/fish completions);
#   - the installed man pages render with `man` and the installed bash
#     completion completes a subcommand's options;
#   - /etc/default/nkv is a conffile and the maintainer scripts enable the
#     units and only call systemctl when systemd is running;
#   - `dpkg -i` succeeds (also where systemd is not PID 1: the generated
#     postinst skips starting the service when /run/systemd/system is absent);
#   - nkv.service and nkv.socket are enabled (their symlinks exist) and the
#     installed units pass `systemd-analyze verify`;
#   - `/usr/bin/nkv-server --version` prints the package version.
#
# Usage: packaging/build-deb.sh [--no-install] [--purge]
#   --no-install  build and check the .deb only
#   --purge       remove the package again after the checks (`dpkg --purge nkv`)
set -euo pipefail

install=1
purge=0
for arg in "$@"; do
    case $arg in
        --no-install) install=0 ;;
        --purge) purge=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-deb: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

fail() { echo "build-deb: FAIL: $*" >&2; exit 1; }
step() { echo "build-deb: $*"; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

grep -q '^\[package\.metadata\.deb\]' Cargo.toml \
    || fail "Cargo.toml has no [package.metadata.deb]; paste packaging/deb-metadata.toml into it"
for f in README.md LICENSE; do
    [[ -f $f ]] || fail "$f is missing; the package ships it as documentation"
done
command -v dpkg-deb >/dev/null || fail "dpkg-deb not found (this script needs a Debian-based system)"

if ! cargo deb --version >/dev/null 2>&1; then
    step "installing cargo-deb"
    cargo install cargo-deb --locked
fi

step "building the binaries and generating man pages and completions"
cargo build --release --locked --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
assets=target/assets
mkdir -p "$assets"
"$target_dir/release/nkv-server" --man | gzip -9n > "$assets/nkv-server.1.gz"
"$target_dir/release/nkv-client" man | gzip -9n > "$assets/nkv-client.1.gz"
"$target_dir/release/nkv-client" completions bash > "$assets/nkv-client.bash"
"$target_dir/release/nkv-client" completions zsh > "$assets/_nkv-client"
"$target_dir/release/nkv-client" completions fish > "$assets/nkv-client.fish"

step "building the package ($(cargo deb --version))"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The .deb goes to <target dir>/debian/; cargo-deb prints its path as the last
# line on stdout.
cargo deb --locked | tee "$out/build.log"
deb=$(tail -n 1 "$out/build.log")
[[ -f $deb ]] || fail "cargo deb did not report a .deb (last line: '$deb')"
version=$(dpkg-deb -f "$deb" Version)
upstream=${version%-*}
step "built $deb (version $version)"

step "checking contents (dpkg-deb -c)"
dpkg-deb -c "$deb" | tee "$out/contents.txt"
# cargo-deb 3 installs units under /usr/lib/systemd/system (Debian requires it
# from trixie on); on bookworm and later /lib is a symlink to /usr/lib, so that
# is also /lib/systemd/system. Older cargo-deb used /lib/systemd/system.
unitdir=./usr/lib/systemd/system
if grep -q ' \./lib/systemd/system/nkv\.service$' "$out/contents.txt"; then
    unitdir=./lib/systemd/system
fi
expected=(
    ./usr/bin/nkv-server
    ./usr/bin/nkv-client
    "$unitdir/nkv.service"
    "$unitdir/nkv.socket"
    ./usr/lib/tmpfiles.d/nkv.conf
    ./etc/default/nkv
    ./usr/share/doc/nkv/README.md
    ./usr/share/doc/nkv/LICENSE
    ./usr/share/doc/nkv/copyright
    ./usr/share/man/man1/nkv-server.1.gz
    ./usr/share/man/man1/nkv-client.1.gz
    ./usr/share/bash-completion/completions/nkv-client
    ./usr/share/zsh/vendor-completions/_nkv-client
    ./usr/share/fish/vendor_completions.d/nkv-client.fish
)
missing=0
for path in "${expected[@]}"; do
    if ! awk '{print $6}' "$out/contents.txt" | grep -qxF "$path"; then
        echo "build-deb: missing from the package: $path" >&2
        missing=1
    fi
done
((missing == 0)) || fail "the package lacks expected files"
[[ $(awk '$6 == "./usr/bin/nkv-server" {print $1}' "$out/contents.txt") == -rwxr-xr-x ]] \
    || fail "/usr/bin/nkv-server is not mode 755"

step "checking control files"
# cargo-deb wraps a Cargo.toml description longer than 80 characters, and the
# wrapped tail then reads as the first line of the extended description.
synopsis=$(dpkg-deb -f "$deb" Description | head -n 1)
if (( ${#synopsis} >= 80 )) || [[ $(dpkg-deb -f "$deb" Description | sed -n 2p) != " nkv "* ]]; then
    echo "build-deb: warning: the package synopsis was wrapped; keep [package] description in Cargo.toml under 80 characters" >&2
fi
dpkg-deb -e "$deb" "$out/control"
grep -qxF /etc/default/nkv "$out/control/conffiles" || fail "/etc/default/nkv is not a conffile"
[[ -f $out/control/postinst ]] || fail "no postinst: systemd-units did not generate maintainer scripts"
for unit in nkv.service nkv.socket; do
    grep -q "deb-systemd-helper enable $unit" "$out/control/postinst" \
        || fail "postinst does not enable $unit"
done
grep -q '/run/systemd/system' "$out/control/postinst" \
    || fail "postinst does not check for a running systemd before starting units"

if ((install == 0)); then
    step "ok: $deb (not installed: --no-install)"
    exit 0
fi

[[ $(id -u) == 0 ]] || fail "dpkg -i needs root (or use --no-install)"
step "installing (dpkg -i)"
dpkg -i "$deb" || fail "dpkg -i failed"

step "checking the installed package"
for unit in multi-user.target.wants/nkv.service sockets.target.wants/nkv.socket; do
    [[ -L /etc/systemd/system/$unit ]] || fail "$unit is not enabled (no /etc/systemd/system/$unit)"
done
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "${unitdir#.}/nkv.service" "${unitdir#.}/nkv.socket" \
        || fail "systemd-analyze verify rejected the installed units"
fi
if command -v man >/dev/null; then
    for page in nkv-server nkv-client; do
        MANPAGER=cat MANWIDTH=80 man "$page" 2>/dev/null | grep -q "EXIT STATUS" \
            || fail "man $page does not show the installed page with its EXIT STATUS"
    done
fi
# What bash does on Tab: the installed script's function, asked about `wait --e`.
completed=$(bash -c 'source /usr/share/bash-completion/completions/nkv-client
    COMP_WORDS=(nkv-client wait --e); COMP_CWORD=2
    _nkv__client nkv-client --e wait; echo "${COMPREPLY[*]}"') || true
[[ $completed == --equals ]] || fail "the installed bash completion completes 'nkv-client wait --e' to '$completed'"
got=$(/usr/bin/nkv-server --version) || fail "/usr/bin/nkv-server --version failed"
echo "$got"
[[ $got == *"$upstream"* ]] || fail "nkv-server --version printed '$got', expected version $upstream"

if ((purge == 1)); then
    step "purging (dpkg --purge nkv)"
    dpkg --purge nkv || fail "dpkg --purge failed"
fi
step "ok: $(basename "$deb")"
