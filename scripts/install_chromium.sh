#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the MLflow UI test (tests/test_mlflow_ui.py).
# Idempotent: does nothing when /usr/bin/chromium is already present. Needs root (or sudo).
set -euo pipefail

if command -v chromium >/dev/null; then
    echo "install_chromium: $(chromium --version 2>/dev/null | head -n1) already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
echo "install_chromium: installed $(chromium --version 2>/dev/null | head -n1)"
