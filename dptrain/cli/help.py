"""`dptrain --help` and `dptrain --help <group>`: the page a user reads. Every knob's meaning is its comment in
config.py, its default the dataclass's and its range config.RANGES — the same sources the run and its checks
use, so the page cannot drift from them. Hydra's own page stays at `--hydra-help`, the composed config at
`--cfg job`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import typing

from dptrain import config
from dptrain.errors import check_name

EXAMPLES = [
    ("dptrain", "a small CNN on the embedded digits data at eps = 3 (about 40 s on 2 CPU cores)"),
    ("dptrain model=resnet18 dataset=cifar10 eps=1", "ResNet-18 on CIFAR-10 (downloads it to data/ when online)"),
    ("dptrain dataset=folder dataset.root=/data/xray eps=8", "your images: root/train/<class>/*, root/test/<class>/*"),
    ("dptrain engine=opacus", "the Opacus baseline on the same Poisson batches (slower: minutes for the default)"),
    ("dptrain -m eps=1,3,8 dataset=fake", "a sweep: three runs under multirun/train/<date>/"),
]
# the key groups: TrainConfig's fields that are dataclasses (model.<key>=…), read off the config, never listed here
_HINTS = typing.get_type_hints(config.TrainConfig)
GROUPS = {f.name: _HINTS[f.name] for f in dataclasses.fields(config.TrainConfig)
          if dataclasses.is_dataclass(_HINTS[f.name])}


def _topics(conf_dir: str) -> list[str]:
    """The key groups, then the option-only groups of conf/ (experiment, table, regime, …; hydra's own aside)."""
    dirs = sorted(d for d in os.listdir(conf_dir) if os.path.isdir(os.path.join(conf_dir, d)) and d != "hydra")
    return [*GROUPS, *(d for d in dirs if d not in GROUPS)]


def page(conf_dir: str, topic: str | None = None) -> str:
    """The help text: the overview, or one group's page. An unknown topic raises UserError."""
    if topic is None:
        return _overview(conf_dir)
    check_name("help topic", topic, _topics(conf_dir))
    return _group(conf_dir, topic)


def _overview(conf_dir: str) -> str:
    out = ["usage: dptrain [KEY=VALUE ...] [GROUP=OPTION ...]   (Hydra overrides; -m/--multirun for a sweep)", "",
           "Differentially private (DP-SGD) training of a vision model to a target privacy budget eps.", "",
           "headline knobs (=default, meaning, range):"]
    out += _knobs(config.TrainConfig, "")
    out += ["", "groups (`dptrain --help <group>` for its options and keys):"]
    topics = _topics(conf_dir)
    w = max(map(len, topics)) + 1
    for g in topics:
        opts = config.conf_options(g, conf_dir)
        if opts:
            out.append(f"  {g:<{w}}{', '.join(opts)}")
        else:
            out.append(f"  {g:<{w}}keys only: {g}.<key>=...")
    out += ["", "examples:"]
    out += [f"  {cmd:<52} # {why}" for cmd, why in EXAMPLES]
    out += ["", "A mistake on the command line is one line `dptrain: error: ...` and exit status 2.",
            "More: dptrain --cfg job (the composed config), dptrain --hydra-help (Hydra's flags), README.md."]
    return "\n".join(out)


def _group(conf_dir: str, group: str) -> str:
    out = [f"dptrain {group}=<option>" + (f" and {group}.<key>=<value>" if group in GROUPS else ""), ""]
    opts = config.conf_options(group, conf_dir)
    if opts:
        out.append("options:")
        out += [f"  {o:<22}{_first_comment(os.path.join(conf_dir, group, o + '.yaml'))}" for o in opts]
    if group in GROUPS:
        out += ["", "keys (=default, meaning, range):"]
        out += _knobs(GROUPS[group], f"{group}.")
    return "\n".join(out)


def _knobs(cls, prefix: str) -> list[str]:
    comments = _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in GROUPS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        rng = config.RANGES.get(prefix + f.name)
        knob = f"{prefix}{f.name}={_show(default)}"
        out.append(f"  {knob:<30}{comments.get(f.name, '')}" + (f"  range {rng}" if rng else ""))
    return out


def _show(v) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _field_comments(cls) -> dict[str, str]:
    """field name → its comment in config.py: the one on its line, else the comment lines just above it."""
    lines, start = inspect.getsourcelines(cls)
    body = ast.parse("".join(lines)).body[0]
    out = {}
    for node in body.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        line = lines[node.lineno - 1]
        text = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        i = node.lineno - 2
        above = []
        while not text and i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("# "))
            i -= 1
        out[node.target.id] = _sentence(text or " ".join(above))
    return out


def _sentence(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[:width - 1].rsplit(" ", 1)[0] + " …"


def _first_comment(path: str) -> str:
    with open(path) as f:
        for line in f:
            if line.startswith("#") and not line.startswith("# @package"):  # Hydra's directive is not a summary
                return _sentence(line.lstrip("# ").strip(), 80)
    return ""
