"""Where a PrivacyEngine is inside one backward, as flags its hooks read (never strings), and the one-pass path.

The engine holds one "passes" object, `OnePass()` (passes=1) or `two_pass.TwoPass` (passes=2), and reads its
`phase` whenever a hook fires. passes=1 is always ONE_PASS. passes=2 steps through NORMS, RECOMPUTE and SUM inside
the user's `loss.backward()` and is at ONE_PASS's flags in between (no backward of the engine's is in flight then).

What a passes object provides (the engine uses nothing else of it):
  phase                    the current Phase.
  handles                  hook handles the engine removes in `detach()`.
  start(args, kwargs)      at each training forward of the model (grad enabled), with its inputs.
  compare(rec, k, g)       when `phase.compare`: the gradient g of output k of a hooked call `rec`.
  clip(rec)                when `phase.plain_sum`, after records.ready: scale rec.grads' rows by the clip factors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    name: str
    # a forward of the model starts a new step (new records, a new forward id); False: the recomputed forward of
    # passes=2, whose records the passes restart themselves
    new_forward: bool = True
    # the first output gradient queues the engine's _finish (book-keeping: norms, clip factors and the clipped sum
    # after this one backward); passes=2 runs the rules itself from its backward hook
    queue_finish: bool = True
    # a rule keeps what its accumulate needs; False: the norm pass, whose clipped sum comes from the second backward
    keep_state: bool = True
    # the passes scale the output gradients' rows by c_i (clip), then a rule adds its plain weight gradient
    # (Rule.accumulate_plain)
    plain_sum: bool = False
    # every output gradient goes to the passes' tripwire (TwoPass.compare)
    compare: bool = False


ONE_PASS = Phase("one pass")
NORMS = Phase("norms", queue_finish=False, keep_state=False, compare=True)
RECOMPUTE = Phase("recompute", new_forward=False, queue_finish=False, compare=True)
SUM = Phase("sum", queue_finish=False, plain_sum=True, compare=True)


class OnePass:
    """passes=1 (book-keeping): one backward, nothing to add to the engine's hooks."""

    phase = ONE_PASS
    handles: tuple = ()

    def start(self, args, kwargs) -> None:
        pass

    def compare(self, rec, k, g) -> None:  # never called: ONE_PASS.compare is False
        pass

    def clip(self, rec) -> None:  # never called: ONE_PASS.plain_sum is False
        pass
