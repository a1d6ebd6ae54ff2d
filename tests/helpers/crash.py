"""`python tests/crash.py KILL [dptrain overrides]`: the `dptrain` command, SIGKILLed by itself at a known point
— deterministic, not a timer. test_checkpoint.py runs it as a subprocess.

KILL is one of
    step:K     once the process's K-th optimizer step is taken (the weights updated), before anything after it
               is checkpointed or logged
    write:N    inside its N-th checkpoint write, with half of checkpoint.pt.tmp on disk
    rename:N   after its N-th checkpoint.pt.tmp is complete and synced, before the rename over checkpoint.pt
"""

import io
import os
import signal
import sys

import torch


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str) -> None:
    kind, n = kill.split(":")
    n, count = int(n), [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    if kind == "step":
        import dptrain.train.loop

        real_all_finite = dptrain.train.loop.all_finite  # called once per step, right after it

        def all_finite(tensors):
            if hit():
                die()
            return real_all_finite(tensors)

        dptrain.train.loop.all_finite = all_finite
    elif kind == "write":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(getattr(f, "name", "")).endswith("checkpoint.pt.tmp") and hit():
                buf = io.BytesIO()
                real_save(obj, buf, *args, **kwargs)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif kind == "rename":
        real_replace = os.replace

        def replace(src, dst, **kwargs):
            if str(dst).endswith("checkpoint.pt") and hit():
                die()
            return real_replace(src, dst, **kwargs)

        os.replace = replace
    else:
        raise SystemExit(f"crash.py: unknown kill point {kill!r}")


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.argv = ["dptrain", *sys.argv[2:]]
    from dptrain.cli.train import main

    main()
