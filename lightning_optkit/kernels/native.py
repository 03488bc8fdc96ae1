"""Building and loading the kit's native CPU kernels (C files next to this module) with the system compiler.

The first use in a process compiles a C file (about a second) into a cache folder (``LIGHTNING_OPTKIT_CACHE``,
else ``~/.cache/lightning_optkit``, else the temp folder), keyed by the source, the flags and the CPU, and
loads it with ctypes; later processes load the cached library. The flags (:data:`FLAGS`) give IEEE operations
in a fixed order (no fast-math, no contraction), so a kernel's results do not depend on the vector width.
Without a compiler, or when building or loading fails, :func:`load` logs a warning once per kernel and returns
``None``; each caller then runs its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE_ENV = "LIGHTNING_OPTKIT_CACHE"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread") + (
    ("-mprefer-vector-width=256",) if platform.machine().lower() in ("x86_64", "amd64") else ())

log = logging.getLogger("lightning_optkit.kernels")


def switched_on(env: str) -> bool:
    """False when the environment variable ``env`` is 0/false/off/no (unset: on)."""
    return os.environ.get(env, "1").strip().lower() not in ("0", "false", "off", "no")


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{flags}"


def cache_dir() -> Path:
    """Where built kernels are kept (see the module doc)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "lightning_optkit"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / "lightning_optkit"


def build(source: Path, compiler: str) -> Path:
    """Compile ``source`` into the cache, atomically (concurrent processes may build at once); cached by content."""
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_tag().encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.stem}_{digest}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, functions: dict[str, list], what: str, env: str) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load ``source``, declaring ``functions`` (name: argtypes; each returns
    an int); ``None``, with one warning naming ``what`` and the switch ``env``, when that fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if not compiler:
            raise FileNotFoundError("no C compiler (cc/gcc) on PATH")
        lib = ctypes.CDLL(str(build(source, compiler)))
        for name, argtypes in functions.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        return lib
    except (OSError, subprocess.SubprocessError, FileNotFoundError, AttributeError) as err:
        detail = getattr(err, "stderr", b"") or b""
        log.warning("lightning_optkit: the native %s is unavailable (%s %s); torch ops run instead on CPU "
                    "(slower). Set %s=0 to silence this.", what, err, detail.decode(errors="replace")[:500], env)
        return None
