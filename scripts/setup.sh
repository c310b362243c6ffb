#!/usr/bin/env bash
# Idempotent set-up: .venv with the pinned packages, Debian's Fashion-MNIST, Java for TorchServe.
# A second run only compares a hash and checks two paths.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
as_root() { [ "$(id -u)" = 0 ]; }
apt_install() {
  if as_root; then
    echo "setup: installing $* with apt-get"
    apt-get update -qq || echo "setup: apt-get update failed; trying the install anyway"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "setup: missing $*: run 'sudo apt-get install -y $*' (or 'sudo make setup'), then run this again." >&2
    exit 1
  fi
}

# 1. Debian packages: the embedded dataset, Java 17 for TorchServe's frontend, FFmpeg's libraries (torchcodec
#    links them at run time; PyAV carries its own) and HAProxy for the local fleet.
[ -f "$FMNIST" ] || apt_install dataset-fashion-mnist
command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
command -v ffmpeg >/dev/null 2>&1 || apt_install ffmpeg
command -v haproxy >/dev/null 2>&1 || apt_install haproxy

# 2. The virtual environment, reinstalled only when requirements.txt changes.
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "setup: $PYTHON not found; install Python 3.11 or run 'make setup PYTHON=/path/to/python3.11'." >&2
  exit 1
fi
want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "setup: installing Python packages into .venv (first run: a few minutes)"
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, ts, model_archiver, yaml, av, torchmetrics" || {
  echo "setup: the package install failed; see the pip output above." >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done"
