#!/usr/bin/env bash
# Build (once) and cache an arm64 Debian-bookworm Python 3.11 userland plus aarch64
# wheels (numpy, onnxruntime, ai-edge-litert, apache-tvm), runnable on an x86-64 host
# under qemu-user WITHOUT chroot, binfmt_misc, debootstrap second stage or maintainer scripts.
#
#   usage: arm64_userland.sh [CACHE_DIR]        (default ~/.cache/trp-edge/arm64)
#   then:  CACHE_DIR/py -c 'import numpy, onnxruntime, tvm'
#
# Needs on the host: apt-get, dpkg-deb, tar, qemu-aarch64-static (package qemu-user-static),
# debian-archive-keyring, and a host CPython 3.11 with pip (HOST_PY, default python3).
# Does not touch the host's dpkg/apt configuration (isolated APT_CONFIG, no --add-architecture).
# Idempotent: each stage is skipped when its stamp exists; delete CACHE_DIR/<stage> to redo it.
set -euo pipefail

CACHE=$(realpath -m "${1:-${TRP_ARM64_CACHE:-$HOME/.cache/trp-edge/arm64}}")
HOST_PY=${HOST_PY:-python3}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
QEMU=${QEMU:-$(command -v qemu-aarch64-static || true)}
# Debian packages: python3 + libstdc++6 (needed by the onnxruntime/tvm/litert/numpy wheels).
DEBS="python3 libstdc++6"
# Fully pinned wheel set (closure resolved 2026-11; matches /work/main/.venv versions). cloudpickle: TVM's RPC
# server (the emulated `trp-edge serve`). The wheelhouse and SITE are rebuilt when this list changes.
WHEELS="numpy==2.4.6 onnxruntime==1.32.0 ai-edge-litert==2.3.0 apache-tvm==0.27.0.post1
apache-tvm-ffi==0.1.14.post1 flatbuffers==25.12.19 ml-dtypes==0.6.0 protobuf==7.36.2
packaging==26.3 typing-extensions==4.16.0 backports-strenum==1.2.8 tqdm==4.70.1 cloudpickle==3.1.3"

ROOT=$CACHE/rootfs SITE=$CACHE/site WHL=$CACHE/wheels A=$CACHE/apt
[ -x "$QEMU" ] || { echo "qemu-aarch64-static missing: apt-get install qemu-user-static" >&2; exit 1; }
mkdir -p "$CACHE"
# one build at a time (parallel test workers): a second caller waits, then finds the stamps
exec 9>"$CACHE/.lock"
flock 9
ts() { date +%s.%N; }
el() { awk -v a="$1" -v b="$(ts)" 'BEGIN{printf "%.1f", b-a}'; }
say() { printf '[arm64_userland] %s\n' "$*" >&2; }

# ---- 1. download the arm64 .debs with an isolated apt (no host dpkg changes) ----
if [ ! -e "$A/.done" ]; then
  t0=$(ts)
  rm -rf "$A"; mkdir -p "$A"/etc/apt/{apt.conf.d,preferences.d,sources.list.d} \
    "$A"/var/lib/apt/lists/partial "$A"/var/cache/apt/archives/partial "$A"/var/lib/dpkg
  : > "$A/var/lib/dpkg/status"      # empty status => apt resolves the full closure
  echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main" \
    > "$A/etc/apt/sources.list"
  cat > "$A/apt.conf" <<EOF
Dir "$A/";
Dir::State::status "$A/var/lib/dpkg/status";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Debug::NoLocking "true";
EOF
  APT_CONFIG=$A/apt.conf apt-get -qq update
  APT_CONFIG=$A/apt.conf apt-get -qq -y install --download-only $DEBS >/dev/null
  rm -rf "$A"/var/lib/apt/lists "$A"/var/cache/apt/*.bin    # ~115 MB of indexes, not needed again
  touch "$A/.done"
  say "debs downloaded: $(ls "$A"/var/cache/apt/archives/*.deb | wc -l) in $(el $t0) s"
fi

# ---- 2. unpack them into ROOT (merged-/usr layout, no maintainer scripts) ----
if [ ! -e "$ROOT/.done" ]; then
  t0=$(ts)
  rm -rf "$ROOT" "$ROOT.tmp"; mkdir -p "$ROOT.tmp"/usr/{bin,sbin,lib}
  for d in bin sbin lib; do ln -s usr/$d "$ROOT.tmp/$d"; done
  for deb in "$A"/var/cache/apt/archives/*.deb; do
    # --keep-directory-symlink: otherwise a deb shipping ./lib/ replaces the lib -> usr/lib symlink
    dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOT.tmp"
    dpkg-deb -W --showformat='${Package}=${Version}\n' "$deb" >> "$ROOT.tmp/.manifest"
  done
  rm -rf "$ROOT.tmp"/usr/share/{doc,man,info,locale,lintian}
  # Debian ships no stdlib .pyc (postinst makes them): precompile with a host CPython 3.11
  # (same bytecode magic as the guest's 3.11.2) - halves every guest start-up.
  if "$HOST_PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    "$HOST_PY" -m compileall -q -j1 "$ROOT.tmp/usr/lib/python3.11" >/dev/null 2>&1 || true
  fi
  mv "$ROOT.tmp" "$ROOT"; touch "$ROOT/.done"
  say "rootfs unpacked in $(el $t0) s"
fi

# Fake aarch64 /proc/cpuinfo. qemu-user passes the HOST's x86 /proc/cpuinfo through, and
# pytorch/cpuinfo (inside onnxruntime and XNNPACK/LiteRT) segfaults parsing it. qemu -L looks
# guest paths up under ROOT first, so ROOT/proc/cpuinfo shadows it. Describes a Neoverse-N1,
# which must match QEMU_CPU=neoverse-n1 used by the wrapper. Rewritten each run (CPU count).
mkdir -p "$ROOT/proc"
n=$(( $(sed 's/.*-//' /sys/devices/system/cpu/possible) + 1 ))
for ((i = 0; i < n; i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
done > "$ROOT/proc/cpuinfo"

# ---- 3. download aarch64 wheels on the host (no emulation) ----
if [ "$(cat "$WHL/.done" 2>/dev/null)" != "$WHEELS" ]; then
  t0=$(ts)
  plat=(); for v in $(seq 36 -1 17); do plat+=(--platform "manylinux_2_${v}_aarch64"); done
  plat+=(--platform manylinux2014_aarch64)      # bookworm glibc = 2.36; pip matches tags exactly
  rm -rf "$WHL"; mkdir -p "$WHL"
  "$HOST_PY" -m pip download -q --no-cache-dir -d "$WHL" "${plat[@]}" --python-version 3.11 \
    --implementation cp --only-binary=:all: $WHEELS >"$CACHE/pip.log" 2>&1 \
    || { cat "$CACHE/pip.log" >&2; exit 1; }
  for w in $WHEELS; do n=$(echo "${w%%==*}" | tr A-Z- a-z_)   # fail loudly if a pin has no aarch64 wheel
    ls "$WHL" | tr A-Z a-z | grep -q "^${n}-" || { say "no wheel for $w"; exit 1; }; done
  (cd "$WHL" && sha256sum *.whl > SHA256SUMS)
  echo "$WHEELS" > "$WHL/.done"
  say "wheels downloaded in $(el $t0) s"
fi

# ---- 4. install them (offline, from the wheelhouse) into SITE ----
if [ "$(cat "$SITE/.done" 2>/dev/null)" != "$WHEELS" ]; then
  t0=$(ts)
  rm -rf "$SITE" "$SITE.tmp"
  plat=(); for v in $(seq 36 -1 17); do plat+=(--platform "manylinux_2_${v}_aarch64"); done
  plat+=(--platform manylinux2014_aarch64)
  "$HOST_PY" -m pip install -q --no-cache-dir --no-index --find-links "$WHL" --target "$SITE.tmp" \
    "${plat[@]}" --python-version 3.11 --implementation cp --only-binary=:all: $WHEELS >"$CACHE/pip.log" 2>&1 \
    || { cat "$CACHE/pip.log" >&2; exit 1; }
  rm -rf "$SITE.tmp/bin"        # console scripts with host shebangs
  mv "$SITE.tmp" "$SITE"; echo "$WHEELS" > "$SITE/.done"
  say "wheels installed in $(el $t0) s"
fi

# ---- 5. wrapper + env file ----
cat > "$CACHE/py" <<EOF
#!/bin/sh
# aarch64 python3.11 under qemu-user. QEMU_CPU=neoverse-n1 matches the fake ROOT/proc/cpuinfo;
# the default -cpu max gives WRONG int8 results in LiteRT/XNNPACK (qemu 7.2).
# PYTHONNOUSERSITE: the guest would otherwise add the host's ~/.local/lib/python3.11/site-packages.
export QEMU_CPU=\${QEMU_CPU:-neoverse-n1} PYTHONNOUSERSITE=1
export PYTHONPATH="$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
exec "$QEMU" -L "$ROOT" "$ROOT/usr/bin/python3" "\$@"
EOF
chmod +x "$CACHE/py"
cat > "$CACHE/env.sh" <<EOF
export QEMU_LD_PREFIX="$ROOT" QEMU_CPU=neoverse-n1 PYTHONPATH="$SITE" PYTHONNOUSERSITE=1
# then: $QEMU $ROOT/usr/bin/python3 ...
EOF

# ---- 6. smoke test ----
if [ -z "${SKIP_CHECK:-}" ]; then
  t0=$(ts)
  "$CACHE/py" -c 'import platform, numpy, onnxruntime as ort, tvm, tvm_ffi
from tvm import relax
from ai_edge_litert.interpreter import Interpreter
print(platform.machine(), "numpy", numpy.__version__, "ort", ort.__version__, "tvm", tvm.__version__, "tvm_ffi", tvm_ffi.__version__)'
  say "smoke import in $(el $t0) s; sizes: $(du -sh "$ROOT" | cut -f1) rootfs, $(du -sh "$SITE" | cut -f1) site, $(du -sh "$WHL" | cut -f1) wheels, $(du -sh "$A" | cut -f1) debs"
fi
echo "$CACHE/py"
