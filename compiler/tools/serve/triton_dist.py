"""Where the Triton server and its python backend come from: the ``nvidia-pytriton`` wheel.

That wheel carries ``tritonserver`` (2.51), its libraries (``nvidia_pytriton.libs``), the python backend
(``backends/python``) and one python-backend stub per Python version (``python_backend_stubs/3.X``); tqc uses
these files only, never PyTriton's Python API. The stub is linked against ``libpython3.X.so.1.0`` and starts an
*isolated* interpreter (PYTHONPATH is ignored), whose standard library is the one of the libpython it loads, so:

    backends/python/               (a folder of links, made per server)
      libtriton_python.so          -> the wheel's
      triton_python_backend_utils.py -> the wheel's
      triton_python_backend_stub   -> python_backend_stubs/<this Python's X.Y>/
    LD_LIBRARY_PATH = <libpython's folder>:<nvidia_pytriton.libs>

The libpython is this Python's own when it was built shared (a venv's base interpreter, pyenv), else the
system's (Debian's ``/usr/lib/x86_64-linux-gnu``). Packages reach the stub through ``serve.json`` (site folders
of this Python, see ``stub_model.py``); their compiled modules are ABI-compatible since X.Y is the same.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tqc.compiler.core.errors import TqcError

INSTALL_HINT = "pip install 'tqc[serve]' (the nvidia-pytriton wheel carries tritonserver and its python backend)"


@dataclass
class TritonDist:
    server: Path  # tritonserver executable
    libs: Path  # nvidia_pytriton.libs
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python
    libpython_dir: Path  # folder holding libpython3.X.so.1.0 for the stub

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        paths = [str(self.libpython_dir), str(self.libs)] + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))
        return env


def _libpython_dir(version: str) -> Path:
    soname = f"libpython{version}.so.1.0"
    candidates = [sysconfig.get_config_var("LIBDIR"), getattr(sys, "base_prefix", sys.prefix) + "/lib",
                  "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
    for folder in candidates:
        if folder and (Path(folder) / soname).exists():
            return Path(folder)
    raise TqcError(f"the python backend's stub needs {soname} (a shared Python {version}); none found in "
                   f"{', '.join(str(c) for c in candidates if c)} (Debian: apt-get install libpython{version})")


def find_triton() -> TritonDist:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TqcError(f"tritonserver is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    server = dist / "bin" / "tritonserver"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    libs = root.parent / "nvidia_pytriton.libs"
    if not server.exists() or not (dist / "backends" / "python" / "libtriton_python.so").exists():
        raise TqcError(f"'{dist}' lacks tritonserver or its python backend: {INSTALL_HINT}")
    if not stub.exists():
        raise TqcError(f"the nvidia-pytriton wheel has no python-backend stub for Python {version}")
    return TritonDist(server=server, libs=libs, python_backend=dist / "backends" / "python", stub=stub,
                      libpython_dir=_libpython_dir(version))


def site_folders() -> list[str]:
    """Folders of this Python's packages (TQC_SERVE_STUB_PATH, PYTHONPATH, then the venv's), without its standard
    library: the stub's interpreter ignores PYTHONPATH, so these are added to its sys.path by ``stub_model.py``.
    TQC_SERVE_STUB_PATH is for the stub alone, e.g. a folder holding numpy < 2 where tqc itself runs numpy 2."""
    import site

    first = os.environ.get("TQC_SERVE_STUB_PATH", "") + ":" + os.environ.get("PYTHONPATH", "")
    folders = [str(Path(p).resolve()) for p in first.split(":") if p and Path(p).is_dir()]
    for entry in list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path:
        if entry and ("site-packages" in entry or "dist-packages" in entry) and Path(entry).is_dir():
            folders.append(str(Path(entry).resolve()))
    return list(dict.fromkeys(folders))


def make_backend_dir(dist: TritonDist, folder: Path) -> Path:
    """``folder/python`` holding links to the wheel's python backend and this Python's stub."""
    python = folder / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(dist.python_backend / name)
    (python / "triton_python_backend_stub").symlink_to(dist.stub)
    return folder
