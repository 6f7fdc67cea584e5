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
  # Both environments take about 8 GB (torch's CUDA libraries most of it); say so before pip runs out of room.
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if ! compgen -G ".venv/lib/python3*/site-packages/torch" >/dev/null && [ "$free_gb" -lt 9 ]; then
    echo "setup: warning: ${free_gb} GB free on this disk; the install needs about 8 GB and the tests 1 GB more" >&2
  fi
  # torch first, at the release this machine kind holds on local disk (x86-64, Python 3.11);
  # elsewhere let pip pick one that satisfies pyproject.toml.
  # The pin goes into every install so no extra's dependency can move torch.
  TORCH=()
  if [ "$(uname -m)" = x86_64 ] && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    TORCH=("torch==2.14.1" "torchvision==0.29.1")
  fi
  # --no-cache-dir: a copy of every wheel in pip's cache would cost the disk another GB or more.
  .venv/bin/pip install -q --no-cache-dir "${TORCH[@]}" -e ".[all,test]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import trp_edge, torch, onnxruntime, matplotlib, tvm, ai_edge_litert" \
    || { echo "setup: the install did not complete (see pip's output above)" >&2; exit 1; }
  # ExecuTorch pairs with one torch release (1.5.x with 2.14) and does not pin it: install it only beside that torch.
  tv=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
  if [ "${tv%.*}" = "2.14" ]; then
    .venv/bin/pip install -q --no-cache-dir "${TORCH[@]}" -e ".[executorch]" 2>&1 | grep -v "^WARNING: Location" || true
    .venv/bin/python -c "import executorch.runtime" 2>/dev/null \
      || { echo "setup: executorch did not install (see pip's output above)" >&2; exit 1; }
  else
    echo "setup: executorch skipped: executorch 1.5 pairs with torch 2.14, this .venv has torch $tv"
  fi
  # The TFLite converter in its own environment (see pyproject.toml, extra "litert").
  # torch with its CUDA libraries is 5.5 GB: .venv-litert reads it from .venv (a .pth file puts .venv's
  # site-packages after its own) instead of holding a second copy, and keeps its own typing-extensions,
  # which comes first. pip sees torch there as installed and reports .venv's apache-tvm-ffi as a conflict,
  # which it is not here: .venv-litert never imports TVM.
  [ -x .venv-litert/bin/python ] || "$PY" -m venv .venv-litert
  site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
  site .venv/bin/python > "$(site .venv-litert/bin/python)/zz-trp-edge-venv.pth"
  .venv-litert/bin/pip install -q --no-cache-dir "${TORCH[@]}" -e ".[litert]" 2>&1 \
    | grep -vE "^WARNING: Location|^ERROR: pip's dependency resolver|^apache-tvm-ffi .* requires typing-extensions" || true
  .venv-litert/bin/python -c "import trp_edge, litert_torch" >/dev/null 2>&1 \
    || { echo "setup: the TFLite converter environment did not install (see pip's output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
