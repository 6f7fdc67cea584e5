"""Hardware as data: a device target is a TOML file in targets/, read into a frozen `Target`.

A user adds a board by adding a file. Search order for `load_target(name)`: a path given directly, the
directories in $TRP_EDGE_TARGETS (os.pathsep-separated), ./targets, then the targets/ directory of this
checkout. "native" values (triple, mcpu, cores = 0) are detected on this machine when loaded.
"""

from __future__ import annotations

import os
import platform
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

RUNTIMES = ("tvm", "ort", "tflite", "executorch")
GPU_APIS = ("opencl", "cuda", "vulkan")
# the targets shipped with trp-edge: inside an installed package (setup.py copies targets/ there), else the
# checkout's targets/ beside the package
_BUNDLED = next((d for d in (Path(__file__).resolve().parent / "_targets", Path(__file__).resolve().parent.parent /
                             "targets") if d.is_dir()), Path(__file__).resolve().parent.parent / "targets")
_MACHINE_TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}
# Debian package and emulator per foreign architecture: what the host needs to build for and check it.
EMULATORS = {"aarch64": ("qemu-aarch64-static", "qemu-user-static")}
CROSS_PACKAGES = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}


@dataclass(frozen=True)
class CPU:
    triple: str
    mcpu: str
    mattr: tuple[str, ...] = ()
    cores: int = 1
    cross_compiler: str | None = None

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    def tvm_target(self) -> dict[str, Any]:
        t: dict[str, Any] = {"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu, "num-cores": self.cores}
        if self.mattr:
            t["mattr"] = list(self.mattr)
        return t


@dataclass(frozen=True)
class GPU:
    api: str
    device: str | None = None  # TVM's OpenCL "device" attribute: mali, adreno, ...
    arch: str | None = None  # CUDA: sm_87, ...
    model: str | None = None

    def tvm_target(self, host: CPU) -> dict[str, Any]:
        t: dict[str, Any] = {"kind": self.api, "host": host.tvm_target()}
        if self.device:
            t["device"] = self.device
        if self.arch:
            t["arch"] = self.arch
        return t


@dataclass(frozen=True)
class Connection:
    """How the device is reached: a TVM RPC tracker (host:port) and key, or a server at host:port. The one
    connection type: a target file's [rpc] section, and what trp_edge.transport resolves from flags and
    environment."""

    key: str | None = None
    tracker: str | None = None
    host: str | None = None
    port: int = 9090
    token_env: str | None = None  # the environment variable holding the server's token (never the token itself)

    def describe(self) -> str:
        return f"tracker {self.tracker} key {self.key!r}" if self.tracker else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    cpu: CPU
    gpu: GPU | None = None
    runtimes: tuple[str, ...] = RUNTIMES
    threads: int = 1
    rpc: Connection = field(default_factory=Connection)
    path: str | None = None

    @property
    def native(self) -> bool:
        """Artifacts for this target run on this machine as they are (same architecture and OS ABI)."""
        return self.cpu.triple == host_triple()

    @property
    def run_threads(self) -> int:
        return self.threads or self.cpu.cores

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def host_triple() -> str:
    m = platform.machine()
    return _MACHINE_TRIPLES.get(m, f"{m}-linux-gnu")


def host_cpu_name() -> str:
    """LLVM's name for this CPU (what -mcpu=native resolves to); 'generic' without TVM."""
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - no TVM, or an LLVM without host detection
        return "generic"


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("TRP_EDGE_TARGETS", "").split(os.pathsep) if p]
    dirs = [*extra, Path.cwd() / "targets", _BUNDLED]
    seen, out = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen and r.is_dir():
            seen.add(r)
            out.append(r)
    return out


def target_files() -> dict[str, Path]:
    """Target name (file stem) -> file; earlier search directories win."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        for f in sorted(d.glob("*.toml")):
            found.setdefault(f.stem, f)
    return found


def load_target(name_or_path: str | os.PathLike) -> Target:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"target file {p} does not exist")
        return parse_target(p)
    files = target_files()
    if str(name_or_path) not in files:
        known = ", ".join(sorted(files)) or "none"
        raise ConfigError(f"unknown target {str(name_or_path)!r}: known targets are {known} "
                          f"(add targets/{name_or_path}.toml to define it)")
    return parse_target(files[str(name_or_path)])


def all_targets() -> list[Target]:
    return [parse_target(f) for f in target_files().values()]


class _Reader:
    """Typed access to one TOML table; every error names the file and the dotted key."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = ""):
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {why}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        if key not in self.table:
            if required or default is ...:
                raise self.fail(key, "missing")
            return default
        v = self.table[key]
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(key, f"must be {names}, got {v!r}")
        return v

    def strings(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        v = self.get(key, list, list(default))
        if not all(isinstance(s, str) for s in v):
            raise self.fail(key, f"must be a list of strings, got {v!r}")
        return tuple(v)

    def sub(self, key: str) -> _Reader | None:
        v = self.get(key, dict, None)
        return None if v is None else _Reader(self.path, v, f"{self.prefix}{key}.")

    def check_known(self, keys: set[str]) -> None:
        unknown = sorted(set(self.table) - keys)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(keys))})")


def resolve_threads(threads: int | None, target: Target) -> int:
    """The thread count a deployment runs at, and TVM tunes at: `threads` when given, else the target's (0 in
    its file: every core of its CPU). Resolved once per workflow and passed down."""
    return threads or target.run_threads


def parse_target(path: Path) -> Target:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    r = _Reader(path, data)
    r.check_known({"name", "description", "runtimes", "threads", "cpu", "gpu", "rpc"})
    name = r.get("name", str, path.stem)
    runtimes = r.strings("runtimes", RUNTIMES)
    bad = [x for x in runtimes if x not in RUNTIMES]
    if bad:
        raise r.fail("runtimes", f"unknown runtime {bad[0]!r} (known: {', '.join(RUNTIMES)})")
    threads = r.get("threads", int, 1)
    if threads < 0:
        raise r.fail("threads", f"must be >= 0 (0 = all cores), got {threads}")

    c = r.sub("cpu")
    if c is None:
        raise r.fail("cpu", "missing (a [cpu] table with triple and mcpu)")
    c.check_known({"triple", "mcpu", "mattr", "cores", "cross_compiler"})
    triple = c.get("triple", str, required=True)
    if triple == "native":
        triple = host_triple()
    if triple.count("-") < 1:
        raise c.fail("triple", f"must look like arch-vendor-os, got {triple!r}")
    mcpu = c.get("mcpu", str, required=True)
    if mcpu == "native":
        mcpu = host_cpu_name()
    cores = c.get("cores", int, 1)
    if cores < 0:
        raise c.fail("cores", f"must be >= 0 (0 = detect), got {cores}")
    cpu = CPU(triple=triple, mcpu=mcpu, mattr=c.strings("mattr"), cores=cores or (os.cpu_count() or 1),
              cross_compiler=c.get("cross_compiler", str, None))

    gpu = None
    if (g := r.sub("gpu")) is not None:
        g.check_known({"api", "device", "arch", "model"})
        api = g.get("api", str, required=True)
        if api not in GPU_APIS:
            raise g.fail("api", f"unknown GPU API {api!r} (known: {', '.join(GPU_APIS)})")
        gpu = GPU(api=api, device=g.get("device", str, None), arch=g.get("arch", str, None),
                  model=g.get("model", str, None))

    rpc = Connection()
    if (n := r.sub("rpc")) is not None:
        if "token" in n.table:
            raise n.fail("token", "a secret does not go in a target file: export it and name the variable, "
                         'token_env = "MY_BOARD_TOKEN" (or pass --token, or set $TRP_EDGE_TOKEN)')
        n.check_known({"key", "tracker", "host", "port", "token_env"})
        tracker = n.get("tracker", str, None) or None
        if tracker and ":" not in tracker:
            raise n.fail("tracker", f"must be HOST:PORT, got {tracker!r}")
        rpc = Connection(key=n.get("key", str, None), tracker=tracker, host=n.get("host", str, None) or None,
                         port=n.get("port", int, 9090), token_env=n.get("token_env", str, None) or None)
    return Target(name=name, description=r.get("description", str, ""), cpu=cpu, gpu=gpu, runtimes=runtimes,
                  threads=threads, rpc=rpc, path=str(path))


def cross_compiler(target: Target) -> str | None:
    """The C compiler that links this target's shared libraries (None: the host's own)."""
    if target.native and not target.cpu.cross_compiler:
        return None
    cc = target.cpu.cross_compiler
    if not cc:
        raise ConfigError(f"target {target.name}: cpu.cross_compiler is not set for {target.cpu.triple}")
    return cc


def require_tool(tool: str, why: str) -> str:
    """Full path of an executable, or one line naming the Debian package that provides it."""
    found = shutil.which(tool)
    if found:
        return found
    pkg = CROSS_PACKAGES.get(tool) or next((p for exe, p in EMULATORS.values() if exe == tool), None)
    hint = f": apt-get install {pkg}" if pkg else ""
    raise ConfigError(f"{tool} not found ({why}){hint}")
