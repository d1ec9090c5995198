"""How long `forgetless compare` and `forgetless report` take on the quickstart's store, as a
user runs them: each a fresh `forgetless` process, from start-up to exit (issue #31).

Start-up counts because a user waits through it: the imports of the command's path (MLflow,
pandas, and for the report matplotlib and scipy) and the store's opening are part of every
call. Each command runs `--rounds` times; the figure is the median, so one round slowed by
another process on a shared machine does not decide it. The first round of each is run
once before, untimed, so the operating system's file cache is warm for every timed round.
On a shared machine the wall time grows with the load, so each command's CPU time (user +
system, the process and its children) is reported beside it, and the load average.

Without `--store`, the quickstart (grids/quickstart.yaml, 15 cells, --no-ray) first runs
into a temporary store, which takes minutes; `--store sqlite:///PATH --grid NAME` reuses
a store made earlier. `--smoke` builds a tiny grid (2 strategies, 1 seed, 2 experiences)
and times one round: its figures measure nothing.

Run: `.venv/bin/python benchmarks/report_speed.py [--store sqlite:///PATH]`. The last line
printed is one JSON object: `compare_s`, `report_s` (medians, seconds), every round, the
targets and whether they are met, the load average before and after, and the config.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "grids" / "quickstart.yaml"
# Issue #31: the quickstart's five-row table in at most 2 s, its report in at most 5 s.
TARGETS = {"compare_s": 2.0, "report_s": 5.0}
SMOKE_GRID = {
    "name": "report-speed-smoke",
    "seeds": [0],
    "streams": [{"name": "split_digits", "n_experiences": 2}],
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.05},
    "strategies": ["naive", {"name": "rehearsal", "buffer": {"size": 20}}],
}


def forgetless_command() -> list[str]:
    """The `forgetless` console script beside this Python, as a user calls it; the module
    when the package is not installed with its script."""
    script = Path(sys.executable).with_name("forgetless")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "forgetless.experiments.cli"]


def build_store(grid: dict, folder: Path) -> str:
    """Run `grid` into a new SQLite store in `folder` with `forgetless run --no-ray`."""
    grid = {**grid, "storage": str(folder / "checkpoints")}
    path = folder / f"{grid['name']}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.monotonic()
    subprocess.run([*forgetless_command(), "run", str(path), "--tracking-uri", uri, "--no-ray"],
                   cwd=folder, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    print(f"built {uri} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return uri


def timed(command: list[str], folder: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of one run of `command`, and its stdout; a failure stops the
    benchmark."""
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, _children_cpu_s() - cpu_before, done.stdout


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(uri: str, grid_name: str, rounds: int, folder: Path) -> dict:
    """Median and every round of compare and of report (wall seconds), and their median CPU
    seconds, each after one untimed warm-up."""
    base, page = forgetless_command(), str(folder / "report.html")
    commands = {
        "compare_s": [*base, "compare", grid_name, "--tracking-uri", uri],
        "report_s": [*base, "report", grid_name, "--tracking-uri", uri, "--out", page],
    }
    result: dict = {}
    for key, command in commands.items():
        _, _, stdout = timed(command, folder)
        if key == "compare_s":
            result["compare_table"] = stdout.strip()
        wall, cpu, _ = zip(*(timed(command, folder) for _ in range(rounds)))
        name = key.removesuffix("_s")
        result[key] = round(statistics.median(wall), 3)
        result[f"{name}_rounds"] = [round(s, 3) for s in wall]
        result[f"{name}_cpu_s"] = round(statistics.median(cpu), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="reuse this store (sqlite:///PATH or http://HOST:PORT)")
    parser.add_argument("--grid", help="the grid's name in --store (default: quickstart)")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--smoke", action="store_true", help="a tiny grid, one round")
    args = parser.parse_args()
    rounds = 1 if args.smoke else args.rounds
    grid = SMOKE_GRID if args.smoke else yaml.safe_load(QUICKSTART.read_text())
    folder = Path(tempfile.mkdtemp(prefix="report-speed-"))
    try:
        uri = args.store or build_store(grid, folder)
        grid_name = args.grid or grid["name"]
        load_before = os.getloadavg()
        result = measure(uri, grid_name, rounds, folder)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = result.pop("compare_table")
    print(table, file=sys.stderr)
    result.update(
        {
            "targets": TARGETS,
            "targets_met": {k: result[k] <= v for k, v in TARGETS.items()},
            "table_rows": max(0, len(table.split("\n\n")[0].splitlines()) - 1),
            "load_average": {
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in load_after],
            },
            "config": {
                "store": uri if args.store else "built",
                "grid": grid_name,
                "rounds": rounds,
                "cpus": os.cpu_count(),
            },
            "smoke": args.smoke,
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
