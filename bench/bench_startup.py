"""Benchmark 7: start-up. What `pipeline segment` imports, against `import torch, open_clip`.

A user's `segment` / `query` call does well under a second of work on a few images; the rest is
start-up. torch and open_clip are the floor (the model needs them); everything the command
imports on top of them is overhead. Each contender runs as a fresh `python -c ...` (or
`python -m pipeline ...`) subprocess in the repository root, timed from outside: wall time, and
CPU time (user + system), which a busy shared machine distorts far less. Interpreter start is in
every figure (`python -c pass` shows it). The contenders run in turn within each round, the first
one rotating from round to round, so a change of load hits them alike; medians of the rounds are
reported, and each ratio is the median of the per-round ratios (its range beside it).

Contenders:
- `import torch, open_clip`: the floor.
- what `pipeline segment` imports before its run starts: the CLI (`pipeline.cli`), then the stage
  module as `run_stage` imports it (`import_stage`: the cyclic GC paused, the objects frozen after).
- all it imports: the above, then what the run imports when it draws its first overlay
  (`pipeline.results.plots`: matplotlib). `-X importtime` over a whole `pipeline segment` run
  shows only a few PIL plugins and torch's serialization config besides (< 20 ms).
- the same two imported plainly, the GC on throughout (the latter: how the command imported
  them before issue 22), to tell the collector's share from the modules'.
- `pipeline --help` and a parameter error (`pipeline train --set train.epochs=abc`): whole
  commands, which import neither torch nor the stages (tests/test_startup.py).
- with `--run DIR`: a whole `pipeline segment` in a run folder (imports, model, one image,
  outputs), and with `--before TREE` the same with another commit's code, side by side.
Goals (issue 22): all of segment's imports <= 1.3x `import torch, open_clip` (wall); `--help` and
a parameter error < 1 s.

    python bench/bench_startup.py --repeats 5 --json results/bench_startup.json
    python bench/bench_startup.py --explain 25   # what segment imports beyond torch + open_clip
    git worktree add /tmp/before <commit> && pipeline demo --workdir /tmp/demo
    python bench/bench_startup.py --run /tmp/demo --before /tmp/before
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import common

REPO = common.REPO
BASELINE = "import torch, open_clip"
STAGE = "import pipeline.cli; from pipeline.cli.app import import_stage; import_stage('segment')"
PLAIN = "import pipeline.cli, stages.segment"
CONTENDERS = {  # name -> argv after the interpreter
    "python -c pass (interpreter start)": ["-c", "pass"],
    f"`{BASELINE}`": ["-c", BASELINE],
    "`pipeline segment` imports, before its run (CLI, then the stage as `run_stage` imports it)":
        ["-c", STAGE],
    "`pipeline segment` imports, all (the above, then the overlays' matplotlib)":
        ["-c", f"{STAGE}; import pipeline.results.plots"],
    "the same before its run, imported plainly (GC on throughout)": ["-c", PLAIN],
    "all, imported plainly (GC on throughout: as before issue 22)":
        ["-c", f"{PLAIN}, pipeline.results.plots"],
    "`pipeline --help`": ["-m", "pipeline", "--help"],
    "`pipeline train --set train.epochs=abc` (parameter error)": ["-m", "pipeline", "train", "--set",
                                                                 "train.epochs=abc"],
}
BASE, SEG, RUN, PLAIN_SEG, PLAIN_RUN, HELP, ERROR = list(CONTENDERS)[1:]
RATIOS = (SEG, RUN, PLAIN_SEG, PLAIN_RUN)
WHOLE = "a whole `pipeline segment` run (1 image, 2 classes, the run's projectors)"
IMPORT_GOAL, COMMAND_GOAL_S = 1.3, 1.0


def environment(tree: Path = REPO) -> dict[str, str]:
    """The caller's environment with `tree` (this repository) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH", "")) if p)
    return env


def timed_run(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, float]:
    """(wall, CPU) seconds of one fresh interpreter running argv. CPU time (user + system) moves
    far less with the machine's load than wall time. A parameter error must exit 1, anything
    else 0 (a failed import would otherwise look fast)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    expected = 1 if "train.epochs=abc" in argv else 0
    if done.returncode != expected:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def import_times(code: str, env: dict[str, str]) -> dict[str, tuple[int, int]]:
    """module -> (self us, cumulative us) from `python -X importtime -c code`, the collector off:
    with it on, each full collection's pause is charged to whichever module happened to trigger it."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import gc; gc.disable(); {code}"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=True)
    times = {}
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, cumulative, name = line.split(":", 1)[1].split("|")
            times[name.strip()] = (int(own), int(cumulative))
    return times


def explain(code: str, top: int, env: dict[str, str]) -> None:
    """The packages `code` imports beyond the baseline, by their own import time (self time of
    their modules, summed per top-level package), and the project modules that pull each in."""
    base, seg = import_times(BASELINE, env), import_times(code, env)
    extra = {name: t for name, t in seg.items() if name not in base}
    per_package: dict[str, int] = defaultdict(int)
    for name, (own, _) in extra.items():
        per_package[name.split(".")[0]] += own
    total = sum(own for own, _ in extra.values())
    print(f"\n`{code}` imports {len(extra)} modules beyond `{BASELINE}`: {total / 1e6:.2f} s of "
          f"their own import time (one run, -X importtime, the collector off)\n")
    print(common.markdown_table(["package", "seconds"], [[p, us / 1e6] for p, us in sorted(
        per_package.items(), key=lambda kv: -kv[1])[:top]]))
    print("\nWho imports a package: `python -X importtime -c '...' 2>&1 | less` lists each module "
          "after the modules it imported, indented by depth; the first less-indented line below a "
          "module is its importer.")


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="rounds of all contenders (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (page cache, .pyc files)")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="only list the N packages segment imports beyond torch + open_clip, by import time")
    p.add_argument("--run", type=Path, default=None, metavar="DIR",
                   help="also time a whole `pipeline segment` (one image, two classes) in this run folder "
                        "(e.g. demo/ after `pipeline demo`: its configs/params.yaml and projectors)")
    p.add_argument("--before", type=Path, default=None, metavar="TREE",
                   help="with --run: also time that run with the code of TREE (a checkout of another "
                        "commit, e.g. `git worktree add /tmp/before HEAD~3`)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    env = environment()
    if args.explain:
        explain(f"{PLAIN}, pipeline.results.plots", args.explain, env)
        return

    contenders = {n: (argv, REPO, env) for n, argv in CONTENDERS.items()}
    out = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    if args.run is not None:
        image = min(args.run.resolve().glob("data/*/val*/*.jpg"))  # an image of the run's data
        argv = ["-m", "pipeline", "segment", str(image), "--classes", "person,dog", "--params",
                "configs/params.yaml", "--out", str(out)]
        contenders[WHOLE] = (argv, args.run.resolve(), env)
        if args.before is not None:
            contenders[f"{WHOLE}, code of {args.before}"] = (argv, args.run.resolve(),
                                                             environment(args.before.resolve()))
    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    for r in range(args.warmup + args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        timed = {n: timed_run(contenders[n][0], contenders[n][2], contenders[n][1]) for n in order}
        if r >= args.warmup:
            for n, (w, c) in timed.items():
                wall[n].append(w)
                cpu[n].append(c)
            loads.append(os.getloadavg()[0])
    shutil.rmtree(out, ignore_errors=True)
    ratios = [n for n in names if n in RATIOS or n.startswith(WHOLE)]
    wall_ratio = {n: [s / b for s, b in zip(wall[n], wall[BASE])] for n in ratios}
    cpu_ratio = {n: [s / b for s, b in zip(cpu[n], cpu[BASE])] for n in ratios}
    rows = [[n, spread(wall[n]), spread(cpu[n]), spread(wall_ratio[n]) if n in ratios else "",
             spread(cpu_ratio[n]) if n in ratios else ""] for n in names]
    ratio, full = statistics.median(wall_ratio[SEG]), statistics.median(wall_ratio[RUN])
    help_s, error_s = statistics.median(wall[HELP]), statistics.median(wall[ERROR])
    met = max(ratio, full) <= IMPORT_GOAL and help_s < COMMAND_GOAL_S and error_s < COMMAND_GOAL_S
    verdict = (common.verdict(full, f"<= {IMPORT_GOAL}; `--help` and a parameter error < 1 s", met,
                              "`pipeline segment`'s imports (all) / `import torch, open_clip`, wall")
               + f"; before its run {ratio:.2f}x; CPU time {statistics.median(cpu_ratio[RUN]):.2f}x; "
               f"the same modules imported plainly {statistics.median(wall_ratio[PLAIN_RUN]):.2f}x; "
               f"`--help` {help_s:.2f} s, parameter error {error_s:.2f} s")
    setup = (f"Fresh subprocesses in the repository root, {args.repeats} rounds (after {args.warmup} "
             f"untimed), contenders in rotating order; load average {min(loads):.1f}-{max(loads):.1f} "
             "during the rounds. Seconds and ratios: median of the rounds (range).")
    common.report("Start-up: `pipeline segment` imports vs `import torch, open_clip`", setup,
                  ["contender", "wall s", "CPU s", "wall / torch+open_clip", "CPU / torch+open_clip"],
                  rows, verdict, args, {"wall": wall, "cpu": cpu, "wall_ratio": wall_ratio,
                                        "cpu_ratio": cpu_ratio, "loads": loads})


if __name__ == "__main__":
    main()
