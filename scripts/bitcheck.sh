#!/usr/bin/env bash
# usage: scripts/bitcheck.sh <before checkout> <after checkout>  (e.g. a `git worktree add` of the old commit)
# The same four short runs with the code of each checkout (PYTHONPATH), this repo's .venv: prints IDENTICAL when the
# weights are bit-identical and every summary.json value but timings and provenance is equal.
set -u
PY=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
BEFORE=$(cd "$1" && pwd)
WT=$(cd "$2" && pwd)
OUT=$(mktemp -d /tmp/bitcheck.XXXX)
CONFIGS=("epochs=2" "engine=opacus epochs=1" "engine=nonprivate epochs=1" "engine=ghost physical_batch_size=16 epochs=1 engine.clipping=automatic")
i=0
for c in "${CONFIGS[@]}"; do
  for side in before after; do
    src=$BEFORE; [ $side = after ] && src=$WT
    ( cd $src && OMP_NUM_THREADS=1 PYTHONPATH=$src nice -n 10 $PY -m dptrain $c progress=false \
        hydra.run.dir=$OUT/$i-$side > $OUT/$i-$side.log 2>&1 ) || { echo "FAIL $side: $c (log $OUT/$i-$side.log)"; }
  done
  $PY - "$OUT/$i-before" "$OUT/$i-after" "$c" <<'PY'
import json, sys, torch
a, b, c = sys.argv[1:]
ma, mb = torch.load(f"{a}/model.pt", weights_only=False), torch.load(f"{b}/model.pt", weights_only=False)
sa = ma.get("state_dict", ma) if isinstance(ma, dict) else ma.state_dict()
sb = mb.get("state_dict", mb) if isinstance(mb, dict) else mb.state_dict()
same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
ja, jb = json.load(open(f"{a}/summary.json")), json.load(open(f"{b}/summary.json"))
skip = ("time", "samples_per_s", "mem", "commit", "step_ms", "host", "wall", "started", "finished", "diff", "run_dir")
diff = {k: (ja[k], jb.get(k)) for k in ja if not any(s in k for s in skip) and ja[k] != jb.get(k)}
print(("IDENTICAL" if same and not diff else "DIFFERENT"), c, "weights equal:", same, "summary diffs:", diff)
PY
  i=$((i+1))
done
