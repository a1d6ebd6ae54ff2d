"""The GPU check's kit: a bare GPU machine is offline and lacks dptrain's pure-Python dependencies; the committed
wheel folder (wheels/, `make gpu-wheels`) has them. Installed with pip --no-index --no-deps --target, so nothing
is downloaded and the machine's torch is never touched."""

from __future__ import annotations

import glob
import importlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo/dptrain/<role>/x.py


def _dist_name(wheel: str) -> str:
    """A wheel file's distribution name, normalised (PEP 503): hydra_core-1.3.8-py3-none-any.whl → hydra-core."""
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_kit(wheels: str = "wheels", site: str | None = None, dptrain: bool = True,
                timeout: float = 300) -> dict:
    """Install the wheel folder's distributions this Python lacks into `site` (pip --target: --no-index, --no-deps,
    so nothing is downloaded and the installed torch is never touched), then dptrain itself; put the working tree
    and `site` on sys.path and on PYTHONPATH (the subprocesses: gpu tests, memory probes). No wheel folder: nothing
    installed, and the report says which of them are missing."""
    wheels = os.path.join(ROOT, wheels) if not os.path.isabs(wheels) else wheels
    site = site or os.path.join(tempfile.gettempdir(), "dptrain-site")
    found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    out: dict = {"wheels": wheels, "site": site}
    paths = [ROOT]
    if not found:
        out["why"] = f"no wheel folder ({wheels} holds no .whl): nothing installed"
    else:
        need = [w for w in found if not _installed(_dist_name(w))]
        out["present"] = sorted(_dist_name(w) for w in found if w not in need)
        out["installed"] = sorted(_dist_name(w) for w in need)
        pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
               "--find-links", wheels, "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", site]
        if need:
            r = subprocess.run([*pip, *need], capture_output=True, text=True, timeout=max(timeout, 1))
            out["pip_returncode"] = r.returncode
            if r.returncode:
                out["pip_error"] = (r.stdout + r.stderr)[-1500:]
        if dptrain:  # dptrain itself (metadata, console scripts); setuptools of this Python, no download
            r = subprocess.run([*pip, "--no-build-isolation", ROOT], capture_output=True, text=True,
                               timeout=max(timeout, 1), cwd=tempfile.gettempdir())
            out["dptrain"] = "installed" if r.returncode == 0 else f"not installed: {(r.stdout + r.stderr)[-500:]}"
        paths.append(site)
    for p in paths:
        if p not in sys.path:
            sys.path.insert(0 if p == ROOT else len(sys.path), p)
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    importlib.invalidate_caches()
    out["missing"] = [m for m in ("hydra", "omegaconf", "antlr4", "opacus", "kymatio", "submitit", "pytest")
                      if importlib.util.find_spec(m) is None]
    return out
