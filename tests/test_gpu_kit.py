"""Issue #18 item 4: the GPU kit's flow without a GPU — the wheel folder covers what a bare GPU machine lacks, its
install (pip --no-index --no-deps --target) and its absence, the max-batch search, the time budget."""

import glob
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest

from dptrain import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name → distribution: what `import dptrain` and the gpu tests need beyond the GPU machine's preinstalled
# packages (torch, timm, numpy, scipy, pyyaml, pytest, pandas, matplotlib, ...; .library/device/KINDS.md)
KIT = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "opacus": "opacus",
       "kymatio": "kymatio", "appdirs": "appdirs", "backports.configparser": "configparser", "submitit": "submitit",
       "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
       "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher"}


def test_the_wheel_folder_holds_one_pure_python_wheel_per_missing_distribution():
    wheels = glob.glob(os.path.join(ROOT, "wheels", "*.whl"))
    names = sorted(gpu_check._dist_name(w) for w in wheels)
    assert names == sorted(set(names)), "two versions of one distribution stop the whole install"
    assert set(KIT.values()) <= set(names)
    assert all(w.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")) for w in wheels)  # any python 3.12 box
    assert sum(os.path.getsize(w) for w in wheels) < 4 * 2**20  # travels with the working tree (64 MiB in all)
    assert not any(n.startswith(("torch", "wandb", "numpy", "timm")) for n in names)  # never the machine's own


def _wheel(folder, name="kitprobe", version="0.0.1"):
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_kit_installs_only_the_missing_wheels_offline_and_puts_them_on_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _wheel(wheels)
    present = glob.glob(os.path.join(ROOT, "wheels", "omegaconf-*.whl"))[0]  # installed in this venv: skipped
    os.symlink(present, wheels / os.path.basename(present))
    out = gpu_check.install_kit(str(wheels), str(site), dptrain=False)
    assert out["installed"] == ["kitprobe"] and out["present"] == ["omegaconf"] and out.get("pip_returncode") == 0
    assert os.listdir(site) and not glob.glob(str(site / "omegaconf*"))
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    r = subprocess.run([sys.executable, "-c", "import kitprobe, dptrain; print(kitprobe.VALUE)"], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "42", r.stderr


def test_kit_without_a_wheel_folder_installs_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    out = gpu_check.install_kit(str(tmp_path / "none"), str(tmp_path / "site"))
    assert "no wheel folder" in out["why"] and not (tmp_path / "site").exists() and out["missing"] == []


@pytest.mark.parametrize(("fixed", "per", "budget"), [(500, 3.0, 40960), (900, 575.0, 40960), (100, 1.0, 50),
                                                      (10, 0.7, 10000)])
def test_max_batch_search_finds_the_largest_batch_that_fits(fixed, per, budget):
    calls = []

    def peak(b):
        calls.append(b)
        return fixed + per * b + (0.4 * per if b % 2 else 0)  # affine up to a little allocator noise

    out = gpu_check.max_batch_search(peak, budget, max_probes=12)
    probed = len(set(calls))
    best = max((b for b in range(1, 1 << 14) if peak(b) <= budget), default=0)
    assert out["max_batch"] == best and out["exact"]
    assert probed <= 8  # two to fit, the prediction and its neighbour, a little bisection


def test_max_batch_search_out_of_memory_and_probe_limit():
    out = gpu_check.max_batch_search(lambda b: math.inf if b > 20 else 100.0 + b, 1e6, max_probes=5)
    assert out["max_batch"] == 20 or not out["exact"]  # a lower bound, said so, when the probes run out
    assert "out of memory" in json.dumps(out["probes"])


def test_sections_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "gc"
    gpu_check.main(["--device", "cpu", "--no-install", "--time-budget-s", "0", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    skipped = [k for k, v in report.items() if isinstance(v, dict) and "skipped" in v]
    assert {"replay", "bf16_bound", "bench/vgg19", "max_batch", "gpu_tests", "exactness"} <= set(skipped)
    assert (tmp_path / "gc.md").exists() and not (tmp_path / "bench-cpu.csv").exists()
