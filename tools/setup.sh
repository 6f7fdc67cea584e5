#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: Debian packages (when missing), .venv with the project
# and its extras. Idempotent: a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

# The arm64 userland that checks aarch64 artifacts under qemu (tools/arm64_userland.sh) needs only apt,
# dpkg-deb and the Debian keyring: no debootstrap, no binfmt_misc.
APT_PACKAGES=(dataset-fashion-mnist gcc-aarch64-linux-gnu qemu-user-static debian-archive-keyring)
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
  # The pin goes into every install so no extra's dependency can move torch.
  TORCH=()
  if [ "$(uname -m)" = x86_64 ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    TORCH=("torch==2.14.1" "torchvision==0.29.1")
  fi
  .venv/bin/pip install -q "${TORCH[@]}" -e ".[all,test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import trp_edge, torch, onnxruntime, matplotlib, tvm, ai_edge_litert" \
    || { echo "setup: the install did not complete (see pip's output above)" >&2; exit 1; }
  # The TFLite converter in its own environment (see pyproject.toml, extra "litert").
  [ -x .venv-litert/bin/python ] || "$PY" -m venv .venv-litert
  .venv-litert/bin/pip install -q "${TORCH[@]}" -e ".[litert]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv-litert/bin/python -c "import trp_edge, litert_torch" >/dev/null 2>&1 \
    || { echo "setup: the TFLite converter environment did not install (see pip's output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
