"""Data-parallel DP training (distributed.py) on CPU: 2 gloo processes against 1 process.

One spawn of 2 processes runs every scenario of helpers/dist_workers.py (the clipped sum, empty local batches, the
noise's std, Opacus, nonprivate DDP, secure sampling); torchrun runs the CLI end to end; Hydra's submitit and
joblib launchers run sweeps.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY
from helpers.dist_workers import SCENARIOS, reference, worker

from dptrain import keys as key
from dptrain.train.distributed import SINGLE, Dist, worker_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario on 2 gloo processes: {name: [rank 0's result, rank 1's]}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    mp.start_processes(worker, args=(2, _free_port(), str(out), list(SCENARIOS)), nprocs=2, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return {name: [r[name] for r in ranks] for name in SCENARIOS}


def _same_on_both_ranks(results):
    a, b = (r["update"] for r in results)
    assert torch.equal(a, b), "the ranks took different steps"
    return a


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sum_mixed_ghost", "sum_ghost_2pass", "sum_per_sample", "noisy_mixed_ghost",
                                  "empty_mixed_ghost", "empty_opacus", "empty_opacus_ghost", "nonprivate"])
def test_two_ranks_take_the_one_process_step(two_ranks, name):
    """Same examples, same clipping, one all-reduce, the noise once and ÷ L: the 2-rank update is the 1-process
    update (σ = 0: the clipped sums; σ > 0: the ranks draw the 1-process run's noise chunks), on both ranks alike."""
    results = two_ranks[name]
    update = _same_on_both_ranks(results)
    ref = reference(name)
    tol = dict(rtol=1e-10, atol=1e-12) if update.dtype == torch.float64 and "opacus" not in name else dict(
        rtol=1e-5, atol=1e-6)
    assert update.abs().max() > 0
    assert torch.allclose(update, ref["update"], **tol), (update - ref["update"]).abs().max()
    # the ranks' shards partition each logical batch the 1-process run saw: batch[rank::2]
    for step, batch in enumerate(ref["seen"]):
        assert results[0]["seen"][step] == batch[0::2] and results[1]["seen"][step] == batch[1::2]


def test_some_local_batches_are_empty(two_ranks):
    seen = [r["seen"] for r in two_ranks["empty_mixed_ghost"]]
    assert seen[1][0] == [] and seen[0][1] == seen[1][1] == []  # rank 1 alone empty, then both: steps completed


@pytest.mark.parametrize("name", ["std_mixed_ghost", "std_mixed_ghost_empty", "std_secure", "std_opacus",
                                  "std_opacus_empty"])
def test_noise_std_is_sigma_R_over_L(two_ranks, name):
    """The update of one step on 102 400 weights, × L/(σR), has std 1 ± 0.01 (standard error 0.0022): noise
    added on both ranks would give √2, σ/√2 per rank without the sum 1/√2."""
    kw = SCENARIOS[name]
    update = _same_on_both_ranks(two_ranks[name])
    std = float(update.std()) * kw["L"] / (kw["sigma"] * kw.get("R", 1.0))
    assert abs(std - 1) < 0.01, std
    if not kw.get("secure"):  # seeded: the very noise of the 1-process run (secure: OS entropy, fresh each run)
        assert torch.allclose(update, reference(name)["update"], rtol=1e-4, atol=1e-5)


def test_noise_chunks_partition_the_noise():
    """Each noise chunk is drawn by exactly one rank, for any world size (more ranks than chunks: some draw none)."""
    from dptrain.privacy.optimizer import CHUNKS, DPOptimizer

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1)
    assert DPOptimizer(opt, noise_multiplier=1, max_grad_norm=1, expected_batch_size=4).noise_chunks == list(
        range(CHUNKS))
    for world in (2, 3, 8, 11):
        chunks = [DPOptimizer(opt, noise_multiplier=1, max_grad_norm=1, expected_batch_size=4,
                              dist=Dist(rank=r, world_size=world, backend="gloo")).noise_chunks for r in range(world)]
        assert sorted(sum(chunks, [])) == list(range(CHUNKS))


class FakeDist:
    """Rank `rank` of `world_size` in this one process; the all-reduce only counts its calls (the test sums)."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.all_reduces = rank, world_size, 0

    def all_reduce_sum_(self, tensors):
        self.all_reduces += 1


def test_the_ranks_noise_sums_to_the_one_process_noise():
    """Each rank adds only its chunks' draws (zeros elsewhere) before the one all-reduce, so the sum over ranks is
    exactly the 1-process noise, whatever the world size; a 1-process `dist` is no dist (no all-reduce)."""
    from dptrain.privacy.optimizer import DPOptimizer

    def noise(dist):
        p = torch.nn.Parameter(torch.zeros(1000))
        DPOptimizer(torch.optim.SGD([p], lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4,
                    seed=3, dist=dist).add_noise()
        return p.grad

    one = noise(None)
    for world in (2, 3):
        dists = [FakeDist(r, world) for r in range(world)]
        parts = [noise(d) for d in dists]
        assert [d.all_reduces for d in dists] == [1] * world
        assert torch.equal(sum(parts), one) and ((torch.stack(parts) != 0).sum(0) == 1).all()
    single = FakeDist(0, 1)
    assert torch.equal(noise(single), one) and single.all_reduces == 0


def test_secure_sampling_is_one_mask_sharded(two_ranks):
    """Secure mode: the OS mask differs per process, so rank 0 draws it and broadcasts it: the ranks' shards are
    batch[0::2] and batch[1::2] of one batch."""
    a, b = (r["seen"] for r in two_ranks["secure_sampling"])
    for x, y in zip(a, b):
        batch = sorted(x + y)
        assert x == batch[0::2] and y == batch[1::2]
    _same_on_both_ranks(two_ranks["secure_sampling"])


def test_single_process_is_a_no_op():
    assert not SINGLE.enabled and SINGLE.is_main and SINGLE.agree("x") == "x" and SINGLE.sum(1.0, 2) == [1.0, 2]
    assert SINGLE.from_rank0(lambda: 3) == 3 and SINGLE.describe(torch.device("cpu")) == "cpu"
    assert Dist(rank=1, world_size=2, backend="gloo").describe(torch.device("cpu")) == "cpu x2 (gloo)"
    assert worker_overrides({}) == [] and worker_overrides({"WORLD_SIZE": "2", "RANK": "0"}) == []
    over = worker_overrides({"WORLD_SIZE": "2", "RANK": "1"})
    assert any(o.startswith("hydra.run.dir=") for o in over) and "hydra.output_subdir=null" in over


def test_ddp_turns_the_buffer_sync_off_by_feature_check():
    """#34: DDP's forward_sync_buffers is new in torch 2.13 (it replaces broadcast_buffers); torch 2.11-2.12 take
    broadcast_buffers only. The keyword is chosen by DDP's signature, and this torch's DDP accepts it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    from dptrain.train.distributed import no_buffer_sync

    class New:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=True): ...

    class Old:
        def __init__(self, module, device_ids=None, broadcast_buffers=True): ...

    assert no_buffer_sync(New) == {"forward_sync_buffers": False}
    assert no_buffer_sync(Old) == {"broadcast_buffers": False}
    inspect.signature(DistributedDataParallel.__init__).bind(None, torch.nn.Linear(1, 1),
                                                             **no_buffer_sync(DistributedDataParallel))


# a run of 8 steps (2 epochs of 4) on 64 fake 8×8 images (test_checkpoint.py's), with the per-rank streams that a
# resumed rank must restore as its own: augmentation (2 augmented copies per example), and the noise chunks it draws
RESUMED = ["engine=ghost", "dataset.augment=true", "privacy.augmult=2", "privacy.ema=0.9", "optimizer=adam",
           "optimizer.schedule=cosine"]


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_end_bit_identical(tmp_path):
    """2 gloo processes run dptrain's run() uninterrupted, then killed after step 6 (a checkpoint after every
    step: the last at step 5, inside epoch 2) and resumed: weights (bit for bit), metrics.jsonl, accuracy, steps
    and ε equal the uninterrupted 2-process run's. The checkpoint holds each rank's own state; a 1-process resume
    of it is refused in one line."""
    import torch.multiprocessing as mp
    from helpers.dist_workers import resume_worker
    from helpers.runs import RUN, assert_same_run, status

    mp.start_processes(resume_worker, args=(2, _free_port(), str(tmp_path), [*RUN, *RESUMED]), nprocs=2,
                       start_method="spawn")
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    assert [x[key.STEP] for x in status(tmp_path / "run")["resumed"]] == [5]

    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    r0, r1 = state["ranks"]
    # each rank drew its own noise chunks (rank r: chunks r, r+2, ...) and its own augmentations
    noise0, noise1 = r0["engine"]["noise"]["cpu"], r1["engine"]["noise"]["cpu"]
    assert not torch.equal(noise0[0], noise1[0]) and not torch.equal(noise0[1], noise1[1])
    assert not torch.equal(r0["rng"]["augment"], r1["rng"]["augment"])
    assert torch.equal(r0["rng"]["sampler"]["state"], r1["rng"]["sampler"]["state"])  # the one shared stream
    assert r0["totals"]["loss"] != r1["totals"]["loss"]  # epoch 2's running sums: over each rank's own shards
    assert state["position"]["totals"] == r0["totals"]

    from helpers.runs import EVERY_STEP, compose

    from dptrain.errors import UserError
    from dptrain.train.checkpoint import load

    with pytest.raises(UserError, match=r"written by 2 process\(es\), this run has 1; .* continue it on as many: "
                                        r"torchrun with 2 processes") as err:
        load(compose(*RUN, *RESUMED, EVERY_STEP, f"resume={tmp_path / 'killed'}"), world_size=1)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [("engine=opacus",), ("engine=nonprivate",), ("engine=ghost", "engine.passes=2")],
                         ids=["opacus", "nonprivate", "two_pass"])
def test_two_ranks_killed_and_resumed_every_engine(tmp_path, engine):
    """The other engines on 2 processes (~50 s each here): Opacus' distributed optimizer (its noise generator on
    rank 0), DDP for nonprivate (shuffled batches), the built-in engine's 2-pass mode."""
    import torch.multiprocessing as mp
    from helpers.dist_workers import resume_worker
    from helpers.runs import RUN, assert_same_run

    mp.start_processes(resume_worker, args=(2, _free_port(), str(tmp_path), [*RUN, *engine]), nprocs=2,
                       start_method="spawn")
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_a_one_process_checkpoint_is_not_resumed_on_two(tmp_path, monkeypatch):
    """The other way round: a checkpoint of one process, resumed by 2 (what rank 0 checks before sending it)."""
    from helpers.runs import EVERY_STEP, RUN, Killed, compose, interrupt

    from dptrain.errors import UserError
    from dptrain.train.checkpoint import check_world_size, load
    from dptrain.train.run import run

    d = tmp_path / "one"
    interrupt(monkeypatch, 2)
    with pytest.raises(Killed):
        run(compose(*RUN, EVERY_STEP), str(d))
    cfg = compose(*RUN, EVERY_STEP, f"resume={d}")
    assert load(cfg)["world_size"] == 1
    with pytest.raises(UserError, match=r"written by 1 process\(es\), this run has 2; .*: dptrain resume="):
        load(cfg, world_size=2)
    check_world_size({}, 1, "x")  # a checkpoint from before the key: one process
    with pytest.raises(UserError, match="written by 1 process"):
        check_world_size({}, 4, "x")


@pytest.mark.slow
def test_torchrun_sigkilled_and_resumed_is_bit_identical(tmp_path):
    """The CLI end to end (52-93 s on the shared 2-core VM): `torchrun --nproc_per_node=2 -m dptrain`, once left alone
    and once SIGKILLed (both ranks, helpers/crash.py) after its 6th step with a checkpoint after every step, then
    `torchrun --nproc_per_node=2 -m dptrain resume=<dir>`: bit-identical weights, the same metrics, ε, steps and
    accuracy."""
    from helpers.runs import CRASH, EVERY_STEP, RUN, assert_same_run, status

    ref, d = tmp_path / "ref", tmp_path / "run"
    _torchrun(*RUN, *RESUMED, f"hydra.run.dir={ref}", cwd=tmp_path)
    r = _torchrun(*RUN, *RESUMED, EVERY_STEP, f"hydra.run.dir={d}", cwd=tmp_path, script=[CRASH, "step:6"], ok=False)
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-3000:]
    st = status(d)
    assert not (d / "summary.json").exists() and st[key.STATUS] == "running" and st[key.STEP] == 5
    _torchrun(f"resume={d}", cwd=tmp_path)
    assert_same_run(ref, d)
    assert [x[key.STEP] for x in status(d)["resumed"]] == [5] and not (d / "checkpoint.pt").exists()


def _torchrun(*args, cwd, nproc=2, timeout=600, script=("-m", "dptrain"), ok=True):
    """`torchrun --nproc_per_node=<nproc> -m dptrain <args>` (script: another program and its first arguments)."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
           str(_free_port()), *script, *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _summaries(root):
    found = sorted(root.rglob("summary.json"))
    return found, [json.loads(p.read_text()) for p in found]


def _check_run_dir(s: dict, path, one: dict) -> None:
    """rank 0's summary: ε, σ, q, steps and δ of the same command on one process; rank 1 left no file."""
    assert s[key.DEVICE] == "cpu x2 (gloo)"
    for k in (key.EPS_SPENT, key.NOISE_MULTIPLIER, key.SAMPLE_RATE, key.STEPS, key.DELTA):
        assert s[k] == (pytest.approx(one[k]) if isinstance(one[k], float) else one[k]), k
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == [".hydra", "cli.log", "metrics.jsonl", "model.pt", "status.json", "summary.json"], files


@pytest.mark.slow
def test_torchrun_multirun(tmp_path, quick):
    """`torchrun --nproc_per_node=2 -m dptrain -m engine=mixed_ghost,nonprivate`: the built-in engine and DDP
    through the CLI, a Hydra multirun in the same 2 processes; each job one run directory, one summary.json."""
    engines = ["mixed_ghost", "nonprivate"]
    _torchrun("-m", f"engine={','.join(engines)}", *TINY, cwd=tmp_path)
    found, runs = _summaries(tmp_path / "multirun")
    assert sorted(s[key.ENGINE] for s in runs) == sorted(engines), found
    for s, path in zip(runs, found):
        _check_run_dir(s, path, quick(f"engine={s[key.ENGINE]}", *TINY)[0])
    assert len(list((tmp_path / "multirun" / "train").iterdir())) == 1  # one sweep directory: rank 0's


@pytest.mark.slow
def test_torchrun_every_engine(tmp_path, quick):
    """A multirun under torchrun, one job per engine (both pass modes of the built-in engine, Opacus' own
    distributed support, nonprivate DDP), each like its 1-process run."""
    engines = ["mixed_ghost", "opacus", "opacus_ghost", "nonprivate"]
    _torchrun("-m", f"engine={','.join(engines)}", *TINY, cwd=tmp_path)
    _torchrun("engine=ghost", "engine.passes=2", "name=two_pass", *TINY, cwd=tmp_path)
    found, runs = _summaries(tmp_path)
    assert sorted(s[key.ENGINE] for s in runs) == sorted([*engines, "ghost"]), found
    for s, path in zip(runs, found):
        _check_run_dir(s, path, quick(f"engine={s[key.ENGINE]}", f"engine.passes={s[key.CONFIG]['engine']['passes']}",
                                      *TINY)[0])
    assert len(list((tmp_path / "multirun" / "train").iterdir())) == 1  # one sweep directory: rank 0's


@pytest.mark.slow
def test_torchrun_digits_default_matches_one_process(tmp_path, compose):
    """The issue's check: `torchrun --nproc_per_node=2 -m dptrain` on the digits default (~1 min on 2 cores)."""
    from dptrain.train.run import run

    _torchrun("progress=false", cwd=tmp_path)
    found, runs = _summaries(tmp_path / "outputs")
    assert len(found) == 1
    two = runs[0]
    one = run(compose("progress=false"), str(tmp_path / "one"))
    for k in (key.EPS_SPENT, key.NOISE_MULTIPLIER, key.SAMPLE_RATE, key.STEPS, key.DELTA):
        assert two[k] == pytest.approx(one[k]), k
    # the same batches and the same noise: the two runs differ by the rounding of the sum's order only
    assert two[key.TEST_ACC] >= 0.6 and abs(two[key.TEST_ACC] - one[key.TEST_ACC]) <= 0.03


def _sweep(tmp_path, launcher, *extra):
    from dptrain.cli.report import main as report

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "dptrain", "-m", f"hydra/launcher={launcher}", "seed=0,1", *TINY,
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    found, runs = _summaries(tmp_path / "sweep")
    assert len(found) == 2 and {s[key.CONFIG]["seed"] for s in runs} == {0, 1}
    report([str(tmp_path / "sweep"), "--table", "t", "--out", str(tmp_path / "results")])
    assert (tmp_path / "results" / "t.csv").read_text().count("\n") == 3  # a header and the 2 runs


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    """Hydra's submitit launcher (submitit_slurm on a cluster): 2 jobs, 2 summaries, one report."""
    _sweep(tmp_path, "submitit_local", "hydra.launcher.timeout_min=10")
    assert list((tmp_path / "sweep").rglob("*_submitted.pkl"))  # submitit's own job files: it did launch them


@pytest.mark.slow
def test_joblib_sweep(tmp_path):
    """Hydra's joblib launcher: parallel local jobs."""
    _sweep(tmp_path, "joblib", "hydra.launcher.n_jobs=2")


def test_slurm_launcher_config_composes(compose):
    """`hydra/launcher=slurm`: the plugin's SlurmLauncher with one task and one GPU per job (no cluster here)."""
    cfg = compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (1, 1, "gpu")


@pytest.mark.slow
def test_bench_processes(tmp_path):
    """`dptrain-bench --processes 1 2`: one row per process count, samples/s and the speed-up over 1 process."""
    import pandas as pd

    from dptrain.cli.bench import main

    main(["--processes", "1", "2", "--models", "cnn", "--engines", "mixed_ghost", "--batches", "8", "--steps", "2",
          "--out", str(tmp_path / "b")])
    df = pd.read_csv(tmp_path / "b" / "bench-dist-cpu.csv")
    assert list(df.processes) == [1, 2] and (df.samples_s > 0).all() and df.speedup.iloc[0] == 1.0
    assert df.comm_ms.iloc[1] > 0 and "speedup" in (tmp_path / "b" / "bench-dist-cpu.md").read_text()


def test_mid_epoch_checkpoints_follow_rank_0s_clock_at_a_few_broadcasts(tmp_path, monkeypatch):
    """Checkpointer.due() under torchrun: rank 0 decides (its clock) and sends (save?, steps to skip) — with 1 s
    steps and every_s=100 it saves at the 100th step, not later, after ~log2(100) broadcasts rather than 100;
    every_s=1e-9 (a checkpoint after every step) checks at every step."""
    import dptrain.train.checkpoint as ckpt
    from dptrain.train.budget import Budget

    class Rank0:
        enabled, is_main, rank, world_size = True, True, 0, 2

        def __init__(self):
            self.calls = 0

        def decide(self, *values):
            self.calls += 1
            return list(values)

    clock = [1000.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock[0])
    for every_s, saves_at, most in ((100, [100, 200], 30), (1e-9, list(range(1, 11)), 10)):
        dist = Rank0()
        saver = ckpt.Checkpointer(str(tmp_path), every_s=0, config={}, commit=None, budget=Budget(0.25, 12),
                                  model=None, optimizer=None, scheduler=None, ema=None, engine=None, sampler=None,
                                  augment=None, t_start=0.0, dist=dist)
        saver.every_s, saver.last, saver._checked = every_s, clock[0], (clock[0], 1)
        saved = []
        for step in range(1, saves_at[-1] + 1):
            clock[0] += 1.0
            if saver.due():
                saved.append(step)
                saver.last = clock[0]  # what save() does
        assert saved == saves_at and dist.calls <= most, (saved, dist.calls)
