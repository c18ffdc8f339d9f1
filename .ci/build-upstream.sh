#!/usr/bin/env bash
# Builds the upstream (nkv 0.1.1) test tools the framed-protocol tests use, into target/foreign/:
# its `nkv-client`, unchanged, and tests/upstream-client (`nkv-upstream-mixed`), which uses its
# Rust client library. The source is read from ../shared/foreign/nkv-0.1.1 (or $NKV_FOREIGN_SRC)
# and copied under target/foreign-src/ with its timestamps, so that cargo's cache in
# target/foreign stays valid from one run to the next. Prints the two paths for the tests:
#   NKV_UPSTREAM_CLIENT=...  NKV_UPSTREAM_MIXED=...
set -euo pipefail
cd "$(dirname "$0")/.."

src="${NKV_FOREIGN_SRC:-../shared/foreign/nkv-0.1.1}"
if [ ! -f "$src/Cargo.toml" ]; then
  echo "build-upstream: no upstream source at $src" >&2
  exit 1
fi
mkdir -p target/foreign-src
# -a keeps modification times: an unchanged tree is not rebuilt.
rm -rf target/foreign-src/nkv-0.1.1.new
cp -a "$src" target/foreign-src/nkv-0.1.1.new
# The source may be a read-only copy; ours must be removable (modes only: times stay).
chmod -R u+w target/foreign-src/nkv-0.1.1.new
if ! diff -rq target/foreign-src/nkv-0.1.1.new target/foreign-src/nkv-0.1.1 >/dev/null 2>&1; then
  rm -rf target/foreign-src/nkv-0.1.1
  mv target/foreign-src/nkv-0.1.1.new target/foreign-src/nkv-0.1.1
else
  rm -rf target/foreign-src/nkv-0.1.1.new
fi

export CARGO_TARGET_DIR="$PWD/target/foreign"
# Both from the helper's workspace, so upstream's dependencies are compiled once (with the
# helper's Cargo.lock, seeded from upstream's); nkv-client's source is upstream's, unchanged.
manifest=tests/upstream-client/Cargo.toml
cargo build --quiet --release --manifest-path "$manifest" -p nkv --bin nkv-client
cargo build --quiet --release --manifest-path "$manifest"
echo "NKV_UPSTREAM_CLIENT=$CARGO_TARGET_DIR/release/nkv-client"
echo "NKV_UPSTREAM_MIXED=$CARGO_TARGET_DIR/release/nkv-upstream-mixed"
