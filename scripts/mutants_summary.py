"""Counts of a `mutmut run` restricted to mutant-name globs, and every mutant not killed (`make mutants`).

    .venv/bin/python scripts/mutants_summary.py 'dptrain.train.budget.*' 'dptrain.privacy.engine.x*_clip_factors__*' …

Reads mutants/**/*.meta (mutmut 3's results); `mutmut results` would also list, as "not checked", the mutants of
engine.py outside the globs.
"""

import collections
import fnmatch
import json
import pathlib
import sys

from mutmut.stats import status_by_exit_code


def main(globs: list[str]) -> int:
    results = {}
    for meta in sorted(pathlib.Path("mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, g) for g in globs):
                results[name] = status_by_exit_code[code]
    counts = collections.Counter(results.values())
    print(f"{len(results)} mutants: " + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    for name, status in sorted(results.items()):
        if status != "killed":
            print(f"    {name}: {status}")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
