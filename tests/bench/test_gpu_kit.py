"""The GPU kit's flow without a GPU — the wheel folder covers what a bare GPU machine lacks, its
install (pip --no-index --no-deps --target) and its absence, the max-batch search, the time budget."""

import glob
import json
import math
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT

from dptrain.bench import gpu_check, gpu_memory, gpu_sections, kit

# import name → distribution: what `import dptrain` and the gpu tests need beyond the GPU machine's preinstalled
# packages (torch, timm, numpy, scipy, pyyaml, pytest, pandas, matplotlib, ...; .library/device/KINDS.md)
KIT = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "opacus": "opacus",
       "kymatio": "kymatio", "appdirs": "appdirs", "backports.configparser": "configparser", "submitit": "submitit",
       "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
       "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher"}


def test_the_wheel_folder_holds_one_pure_python_wheel_per_missing_distribution():
    wheels = glob.glob(os.path.join(ROOT, "wheels", "*.whl"))
    names = sorted(kit._dist_name(w) for w in wheels)
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
    out = kit.install_kit(str(wheels), str(site), dptrain=False)
    assert out["installed"] == ["kitprobe"] and out["present"] == ["omegaconf"] and out.get("pip_returncode") == 0
    assert os.listdir(site) and not glob.glob(str(site / "omegaconf*"))
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    r = subprocess.run([sys.executable, "-c", "import kitprobe, dptrain; print(kitprobe.VALUE)"], env=env,
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout.strip() == "42", r.stderr


def test_kit_without_a_wheel_folder_installs_nothing_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    out = kit.install_kit(str(tmp_path / "none"), str(tmp_path / "site"))
    assert "no wheel folder" in out["why"] and not (tmp_path / "site").exists() and out["missing"] == []


@pytest.mark.parametrize(("fixed", "per", "budget"), [(500, 3.0, 40960), (900, 575.0, 40960), (100, 1.0, 50),
                                                      (10, 0.7, 10000)])
def test_max_batch_search_finds_the_largest_batch_that_fits(fixed, per, budget):
    calls = []

    def peak(b):
        calls.append(b)
        return fixed + per * b + (0.4 * per if b % 2 else 0)  # affine up to a little allocator noise

    out = gpu_memory.max_batch_search(peak, budget, max_probes=12)
    probed = len(set(calls))
    best = max((b for b in range(1, 1 << 14) if peak(b) <= budget), default=0)
    assert out["max_batch"] == best and out["exact"]
    assert probed <= 8  # two to fit, the prediction and its neighbour, a little bisection


def test_max_batch_search_out_of_memory_and_probe_limit():
    out = gpu_memory.max_batch_search(lambda b: math.inf if b > 20 else 100.0 + b, 1e6, max_probes=5)
    assert out["max_batch"] == 20 or not out["exact"]  # a lower bound, said so, when the probes run out
    assert "out of memory" in json.dumps(out["probes"])


def test_sections_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    out = tmp_path / "gc"
    gpu_check.main(["--device", "cpu", "--no-install", "--time-budget-s", "0", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    skipped = [k for k, v in report.items() if isinstance(v, dict) and "skipped" in v]
    assert {"replay", "bf16_bound", "bench/vgg19", "max_batch", "gpu_tests", "exactness"} <= set(skipped)
    assert (tmp_path / "gc.md").exists() and not (tmp_path / "bench-cpu.csv").exists()


# --- one row's failure is that row's result; the clock inside the long sections; CPU pinning ----------

ALLOC = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"


@pytest.mark.slow
def test_an_allocation_error_of_cudnn_or_cublas_is_a_probe_that_does_not_fit(monkeypatch):
    """_cuda_peak: torch's out-of-memory and cuDNN's/cuBLAS's allocation RuntimeErrors are "does not fit" (inf, the
    line kept), as in a max-batch search past the memory; any other error propagates to its row."""
    import torch

    from dptrain.bench import steps

    for f in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, f, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 300 * 2**20)
    fail = {}

    def one_step(eng, x, y, device):
        if len(x) in fail:
            raise fail[len(x)]

    monkeypatch.setattr(steps, "one_step", one_step)
    fail.update({24: RuntimeError(ALLOC), 32: torch.OutOfMemoryError("CUDA out of memory"),
                 40: RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), 48: RuntimeError("shape mismatch")})
    notes, cpu = {}, torch.device("cpu")
    assert gpu_memory._cuda_peak(object(), 16, 4, cpu, notes) == 300.0
    assert [gpu_memory._cuda_peak(object(), b, 4, cpu, notes) for b in (24, 32, 40)] == [math.inf] * 3
    assert "CUBLAS_STATUS_ALLOC_FAILED" in notes[24] and "OutOfMemoryError" in notes[32]
    with pytest.raises(RuntimeError, match="shape mismatch"):
        gpu_memory._cuda_peak(object(), 48, 4, cpu, notes)
    out = gpu_memory.max_batch_search(lambda b: gpu_memory._cuda_peak(object(), b, 4, cpu) if b < 24 else math.inf,
                                     1000.0, max_probes=6)
    assert out["max_batch"] >= 16 and "out of memory" in json.dumps(out["probes"])


@pytest.mark.slow
def test_bench_rows_are_kept_per_engine_whatever_fails(capsys):
    """One engine that cannot be built, one whose memory step raises, one whose memory does not fit: every engine
    keeps its row, with its time where it has one and its error as its note."""
    import torch

    def memory(e):
        if e == "mixed_ghost":
            raise ValueError("a bad layer")
        if e == "opacus":
            raise RuntimeError(ALLOC)
        return {"peak_mem_mb": 5.0, "extra_mem_mb": 1.0}

    engines = ["nonprivate", "no_such_engine", "mixed_ghost", "opacus"]
    rows = gpu_memory.bench_model("cnn", 16, 4, 1, torch.device("cpu"), gpu_memory.Clock(None), engines, memory=memory)
    by = {r["engine"]: r for r in rows}
    assert [r["engine"] for r in rows] == engines
    assert by["nonprivate"]["peak_mem_mb"] == 5.0 and by["nonprivate"]["note"] is None
    assert by["no_such_engine"]["note"].startswith("cannot build") and by["no_such_engine"]["step_ms"] is None
    assert by["mixed_ghost"]["step_ms"] > 0 and by["mixed_ghost"]["note"] == "memory: ValueError: a bad layer"
    assert by["opacus"]["step_ms"] > 0 and "ALLOC_FAILED" in by["opacus"]["note"]


def test_max_batch_keeps_each_engines_result(monkeypatch):
    """An engine whose search raises records its error; the other engine's search stands; the summary renders."""
    import torch

    def one(model, size, device, budget_mb, clock, engine):
        if engine == "opacus":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return gpu_memory.max_batch_search(lambda b: 10.0 + b, budget_mb)

    monkeypatch.setattr(gpu_memory, "_max_batch_one", one)
    out = gpu_memory.max_batch("cnn", 16, torch.device("cpu"), 50.0, gpu_memory.Clock(None))
    assert out["mixed_ghost"]["max_batch"] == 40 and "illegal memory access" in out["opacus"]["error"]
    md = gpu_check.summary_md({"max_batch": out}, [])
    assert "- mixed_ghost: 40 (exact" in md and "illegal memory access" in md


class _Running(gpu_memory.Clock):
    """A clock with `n` checks of plenty left, then none."""

    def __init__(self, n):
        super().__init__(100.0)
        self.n = n

    def left(self):
        self.n -= 1
        return 1000.0 if self.n >= 0 else 0.0


def test_the_clock_is_checked_between_the_rows_of_a_section():
    """Inside the long sections: the bench's rounds stop (each engine keeps its row, said why), the memory of the
    rows after the time ran out is skipped, the exactness cases and the max-batch engines left are skipped."""
    import torch

    cpu = torch.device("cpu")
    engines = ["nonprivate", "mixed_ghost"]
    rows = gpu_memory.bench_model("cnn", 16, 4, 1, cpu, _Running(0), engines, memory=lambda e: {"peak_mem_mb": 1.0})
    assert [r["engine"] for r in rows] == engines
    assert all(r["step_ms"] is None and "time budget ran out after 0 round" in r["note"] for r in rows)
    rows = gpu_memory.bench_model("cnn", 16, 4, 1, cpu, _Running(4), engines, memory=lambda e: {"peak_mem_mb": 1.0})
    assert rows[0]["peak_mem_mb"] == 1.0 and rows[1]["note"] == "memory: skipped (time budget)"
    assert rows[1]["step_ms"] > 0
    out = gpu_sections.exactness(cpu, _Running(0))
    assert out and all(v == "skipped: time budget" for v in out.values())
    out = gpu_memory.max_batch("cnn", 16, cpu, 50.0, _Running(0))
    assert all("time budget" in out[e]["skipped"] for e in ("mixed_ghost", "opacus"))


def test_the_check_imports_nothing_from_tests():
    """The GPU check runs from the package alone: tests/ is off sys.path there (its modules would shadow others)."""
    r = subprocess.run([sys.executable, "-c", "import sys; import dptrain.bench.gpu_check; "
                        "print(sorted(m for m in sys.modules if m.startswith(('test_', 'conftest', 'reference'))))"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.mark.slow
def test_tests_run_on_the_cpu_unless_marked_gpu():
    """`device: auto` is cpu in a test not marked gpu, on a GPU machine too — here and in the subprocesses a
    test starts (the CLI; torchrun, whose workers then pick gloo)."""
    import torch
    from conftest import _selects_gpu_tests

    from dptrain.train.run import _device

    assert not torch.cuda.is_available() and _device("auto") == torch.device("cpu")
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                       text=True)
    assert r.stdout.strip() == "False" and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not _selects_gpu_tests("not slow and not gpu") and _selects_gpu_tests("gpu") and _selects_gpu_tests("")


def test_the_headline_section_stops_at_its_time_budget(tmp_path):
    """The headline command as a subprocess: past its share of the clock it is stopped and said so, and its run
    directory (BEiT-base's model.pt on a GPU) is removed, not left in /tmp."""
    import tempfile

    import torch

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "dptrain-headline-*")))
    out = gpu_sections.headline(torch.device("cpu"), str(tmp_path / "gc"), timeout=1)
    assert out["error"] == "stopped by the time budget after 1 s" and out["command"].startswith("dptrain model=beit")
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "dptrain-headline-*"))) == before


@pytest.mark.slow
def test_the_headline_command_runs_a_few_steps(tmp_path):
    """`dptrain model=beit dataset=cifar100 eps=1`'s few steps on CIFAR-100's shape (CPU sizes): 3 steps, ε spent
    within the calibration's tolerance of 1 (~1 min on the shared 2-core VM)."""
    import torch

    out = gpu_sections.headline(torch.device("cpu"), str(tmp_path / "gc"), timeout=600)
    s = out["summary"]
    assert out["returncode"] == 0 and s["privacy/steps"] == 3 and 0.995 <= s["privacy/eps_spent"] <= 1.0
    assert json.loads((tmp_path / "gc-headline-summary.json").read_text())["summary"] == s
