#!/usr/bin/env bash
# Installs Debian's SLURM (slurmctld, slurmd, sbatch, ...) and munge for the cluster tests.
# Idempotent: does nothing when the binaries are already present. Needs root (or sudo).
set -euo pipefail

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    echo "install_slurm: slurm-wlm and munge already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
echo "install_slurm: installed $(slurmctld -V) and $(munged --version 2>&1 | head -n1)"
