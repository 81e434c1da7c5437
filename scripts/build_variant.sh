#!/usr/bin/env bash
# Build the core in BUILD_DIR with the given meson options and assemble BUILD_DIR/pkg: the Python
# sources with that build's binaries, for scripts/pytest_with_package.py. Prints the package dir.
#   bash scripts/build_variant.sh BUILD_DIR [meson setup options...]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
build=$1
shift
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" "$@" >/dev/null
fi
ninja -C "$build" >/dev/null
pkg="$PWD/$build/pkg"
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r llaisys "$pkg/"
cp "$build"/_core*.so "$build"/libllaisys.so "$pkg/llaisys/"
patchelf --set-rpath '$ORIGIN' "$pkg"/llaisys/_core*.so
echo "$pkg"
