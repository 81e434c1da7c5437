#!/usr/bin/env bash
# Chromium and ChromeDriver for the chat page's browser tests, from Debian's packages, when missing.
# Needs root (or sudo) and apt-get; otherwise it says so, and the browser tests skip (or fail under CI=true).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get > /dev/null; then
  echo "install-chromium: no apt-get here; install chromium and chromedriver yourself for the browser tests" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo > /dev/null; then
    echo "install-chromium: not root and no sudo; the browser tests need chromium and chromium-driver" >&2
    exit 0
  fi
  sudo="sudo -n"
fi
echo "install-chromium: installing chromium and chromium-driver with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends chromium chromium-driver
