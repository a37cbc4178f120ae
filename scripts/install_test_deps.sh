#!/usr/bin/env bash
# Installs the Debian packages the system tests use: a real SLURM (slurm-wlm: slurmctld, slurmd, sbatch; munge) for
# tests/test_cluster_slurm.py and headless-capable Chromium for tests/test_mlflow_ui.py.
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail

have() {  # every named command is on PATH
    local cmd
    for cmd in "$@"; do command -v "$cmd" >/dev/null || return 1; done
}
slurm=() chromium=()
have slurmctld slurmd sbatch munged || slurm=(slurm-wlm munge)
have chromium || chromium=(chromium)
if [ $(( ${#slurm[@]} + ${#chromium[@]} )) -eq 0 ]; then
    echo "install_test_deps: slurm-wlm, munge and chromium already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
if [ ${#slurm[@]} -gt 0 ]; then
    $SUDO apt-get install -y -q --no-install-recommends "${slurm[@]}"
fi
if [ ${#chromium[@]} -gt 0 ]; then
    $SUDO apt-get install -y -q "${chromium[@]}"  # with its recommended fonts, for readable screenshots
fi
echo "install_test_deps: $(slurmctld -V), $(munged --version 2>&1 | head -n1), $(chromium --version 2>/dev/null | head -n1)"
