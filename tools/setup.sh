#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: Debian packages (when missing), .venv with the project
# and its extras. Idempotent: a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist gcc-aarch64-linux-gnu qemu-user-static)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.setup-stamp
want="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the project into .venv"
  # torch first, at the release this machine kind holds on local disk (x86-64, Python 3.11);
  # elsewhere let pip pick one that satisfies pyproject.toml.
  if [ "$(uname -m)" = x86_64 ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  fi
  .venv/bin/pip install -q -e ".[all,test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import trp_edge, torch, onnxruntime, matplotlib" \
    || { echo "setup: the install did not complete (see pip's output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
