"""The `forgetless` command line. Only this module prints."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import time
import typing

from forgetless.core.schema import ConfigError, describe

UI_PORT = 5000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="forgetless", description="Continual-learning experiment grids, tracked in MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a grid (finished cells are skipped)")
    run.add_argument("grid", help="path to a grid YAML file")
    run.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or "
                     "sqlite:///mlflow.db)")  # fmt: skip
    run.add_argument("--address", help="Ray cluster: auto, ray://HOST:10001 (default: "
                     "$RAY_ADDRESS, else a local Ray started in this process)")  # fmt: skip
    run.add_argument("--no-ray", action="store_true",
                     help="run the cells one after another in this process")  # fmt: skip

    validate = commands.add_parser("validate", help="check a grid and list its cells")
    validate.add_argument("grid")

    commands.add_parser("strategies", help="list strategies and their parameters")
    commands.add_parser("streams", help="list streams and their parameters")

    compare = commands.add_parser("compare", help="final metrics, mean ± std over seeds")
    compare.add_argument("grids", nargs="+", metavar="GRID",
                         help="a grid's `name:` (its MLflow experiment) or its YAML file; "
                         "several make one table, a row per grid and group")  # fmt: skip
    _add_grid_arguments(compare)
    compare.add_argument("--sort", default="final/avg_acc",
                         help="metric to sort by, best first (lowest first for forgetting, "
                         "train_time_s, memory_bytes)")  # fmt: skip
    compare.add_argument("--csv", help="also write the table to this CSV file")

    report = commands.add_parser(
        "report", help="one report file: table, statistics over seeds and plots"
    )
    report.add_argument("grid_name", help="the grid's `name:` (its MLflow experiment)")
    _add_grid_arguments(report)
    report.add_argument("--out", help="the report file (default: GRID_NAME-report.html or .md)")
    report.add_argument("--format", choices=["html", "markdown"],
                        help="html (images embedded) or markdown (images in OUT_files/); "
                        "default from --out's suffix, else html")  # fmt: skip
    report.add_argument("--csv", help="also write the final-metrics table to this CSV file")
    report.add_argument("--formats", default="png,svg,pdf",
                        help="the figures' files, comma-separated, of png, svg and pdf "
                        "(default all three; the page shows the PNG, always written)")  # fmt: skip

    ui = commands.add_parser("ui", help="start the MLflow UI on the grid's store, print its URL")
    ui.add_argument("grid_name", nargs="?", help="print the URL of this grid's experiment")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--port", type=int, default=UI_PORT)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from forgetless.experiments.tracking import TrackingUnavailable

    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrackingUnavailable as e:
        print(f"error: {e}; cells that trained keep their checkpoints and are logged when the "
              "grid is run again with the store back", file=sys.stderr)  # fmt: skip
        return 3
    except KeyboardInterrupt:
        print("\ninterrupted: running cells are marked KILLED and resume from their last "
              "checkpoint when the grid is run again", file=sys.stderr)  # fmt: skip
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from forgetless.experiments.compare import compare_table, format_table
    from forgetless.experiments.config import load_grid
    from forgetless.experiments.runner import local_executor, run_grid
    from forgetless.experiments.tracking import check_tracking_uri, resolve_tracking_uri

    grid = load_grid(args.grid)
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    # `kill`, a scheduler's time limit or a closed session end a run as Ctrl-C does: its
    # cells marked KILLED and its Ray tasks cancelled, not left running without a driver.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    counts = dict.fromkeys(("FINISHED", "FAILED", "SKIPPED", "HELD", "UNLOGGED"), 0)
    running = [0]
    bar = tqdm(total=len(grid.cells), desc=grid.name, unit="cell", file=sys.stderr)

    def show() -> None:
        bar.set_postfix(done=counts["FINISHED"], running=running[0], failed=counts["FAILED"],
                        skipped=counts["SKIPPED"] + counts["HELD"], refresh=False)  # fmt: skip

    def on_running(n: int) -> None:
        running[0] = n
        show()

    def on_outcome(outcome) -> None:
        counts[outcome.status] += 1
        for note in outcome.notes:
            tqdm.write(f"note {outcome.label}: {note}", file=sys.stderr)
        if outcome.status in ("FAILED", "HELD", "UNLOGGED"):
            tqdm.write(f"{outcome.status} {outcome.label}: {outcome.error}", file=sys.stderr)
        show()  # before update(1), which draws the bar: else its counts lag a cell behind
        bar.update(1)

    if args.no_ray:
        executor = local_executor
    else:
        from forgetless.experiments.cluster import connect, ray_executor

        connect(args.address)
        executor = ray_executor(grid.resources, len(grid.cells), on_running)
    with _watch_server(uri, lambda text: tqdm.write(text, file=sys.stderr)):
        run_grid(grid, uri, executor, on_outcome=on_outcome)
    bar.close()
    if counts["FINISHED"] + counts["FAILED"]:  # this submission rebuilt the group runs
        try:
            _log_summaries(uri, grid.name)
        except Exception as e:  # noqa: BLE001 - the cells' results are logged all the same
            print(f"warning: the report was not added to the grid's runs ({type(e).__name__}: "
                  f"{e}); `forgetless report {grid.name}` writes it", file=sys.stderr)  # fmt: skip
    print(format_table(compare_table(uri, grid.name)))
    print(f"\n{counts['FINISHED']} cells run, {counts['SKIPPED']} already finished, "
          f"{counts['FAILED']} failed.")  # fmt: skip
    if counts["HELD"]:
        print(f"{counts['HELD']} cells left to the driver that runs them now; run the grid "
              "again after it ends for the full table.")  # fmt: skip
    if counts["UNLOGGED"]:
        print(
            f"{counts['UNLOGGED']} cells trained but could not be logged: the store did not "
            "answer. Run the grid again when it does; they are logged from their checkpoints."
        )
        return 3
    print(f"Report: forgetless report {grid.name} --tracking-uri {uri}\n"
          f"MLflow UI: forgetless ui {grid.name} --tracking-uri {uri}")  # fmt: skip
    return 1 if counts["FAILED"] else 0


def _log_summaries(uri: str, grid_name: str) -> None:
    """Give the submission's parent run the report (HTML, and markdown with its figures
    beside it) and each of its group runs the report page, its accuracy matrix
    averaged over seeds (JSON and heatmap) and its stream's average-accuracy curves, so that
    the MLflow UI holds what the report shows. A grid without a finished cell has none.
    The figures are PNG only (`forgetless report` adds SVG and PDF for papers), and the
    matrices are the ones the report read."""
    import json
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from forgetless.experiments import compare, plots, report, tracking

    summary = tracking.summary_runs(uri, grid_name)
    if summary is None:
        return
    parent, groups = summary
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    built = report.build(uri, grid_name, formats=["png"])
    cells, files = built.cells, built.recorded.matrix_files
    means = compare.mean_accuracy_matrices(cells, built.recorded.matrices)
    store = tracking.Store(uri)
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder, "report", "report.html")
        page.parent.mkdir()
        report.write(built, page, "html")
        report.write(built, page.with_suffix(".md"), "markdown")  # the figures' files
        store.log_artifacts(parent, str(page.parent))
        for key, run_id in groups.items():
            if key not in means:
                continue
            stream, strategy, variant = key
            rows = cells[(cells["stream"] == stream) & (cells["strategy"] == strategy)
                         & (cells["variant"] == variant)]  # fmt: skip
            first = files[next(r for r in rows["run_id"] if r in files)]
            seeds = sum(r in files for r in rows["run_id"])
            label = f"{stream}/{compare.group_label(strategy, variant)}"
            group_files = Path(folder, run_id)
            group_files.mkdir()
            shutil.copy(page, group_files / "report.html")
            curves = page.parent / f"{page.stem}_files" / f"curves-{report.slug(stream)}.png"
            shutil.copy(curves, group_files / "average_accuracy.png")
            matrix = {"experiences": first["experiences"], "R": means[key].tolist(),
                      "score": first["score"], "seeds": seeds}  # fmt: skip
            (group_files / "accuracy_matrix.json").write_text(json.dumps(matrix))
            plots.accuracy_heatmap(means[key], first["experiences"],
                                   f"{label}: mean over {seeds} seeds",
                                   group_files / "accuracy_matrix.png")  # fmt: skip
            store.log_artifacts(run_id, str(group_files))


@contextlib.contextmanager
def _watch_server(uri: str, say: typing.Callable[[str], None], every: float = 10.0):
    """While a grid runs against a tracking server, say when it stops and starts answering:
    the cells retry meanwhile, and a still progress bar alone would say nothing."""
    import threading
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        down_since = None
        while not stop.wait(every):
            try:
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
                if down_since is not None:
                    say(f"tracking server {uri} answers again")
                down_since = None
            except OSError as e:
                if down_since is None:
                    down_since = time.strftime("%H:%M:%S")
                    say(f"tracking server {uri} unreachable since {down_since} ({e}); cells "
                        "keep training and retry logging")  # fmt: skip

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def cmd_validate(args: argparse.Namespace) -> int:
    from forgetless.experiments.config import load_grid
    from forgetless.experiments.footprint import cell_footprint, check_gpu_share, gpu_memory_gb

    grid = load_grid(args.grid)
    memory_gb, source = gpu_memory_gb(grid.resources.gpu_memory_gb)
    footprints = {cell.hash: cell_footprint(cell.config) for cell in grid.cells}
    for cell in grid.cells:
        check_gpu_share(footprints[cell.hash], grid.resources.gpu, memory_gb, source, cell.label())
    print(f"{args.grid}: valid, {len(grid.cells)} cells")
    for cell in grid.cells:
        print(f"  {cell.hash}  {cell.label()}\n      {footprints[cell.hash].describe()}")
    if grid.resources.gpu > 0:
        print(f"each cell's GPU share: {grid.resources.gpu} of {memory_gb:g} GB ({source}); "
              "activations not counted, every parameter trained")  # fmt: skip
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    from forgetless.strategies import STRATEGIES, strategy_class

    strategy_class("naive", "")  # loads the built-ins
    for name in STRATEGIES.names():
        cls = strategy_class(name, name)
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        _print_entry(name, doc, cls.Config, f"supports: {', '.join(cls.supports)}")
    print(
        "avalanche.<Name>\n    any avalanche-lib strategy (Naive, Replay, EWC, LwF, "
        "SynapticIntelligence, GEM, AGEM, GDumb, ...); parameters from its signature\n"
    )
    return 0


def cmd_streams(args: argparse.Namespace) -> int:
    from forgetless.streams import STREAMS, stream_factory

    stream_factory("split_digits", "")  # loads the built-ins
    for name in STREAMS.names():
        factory = stream_factory(name, name)
        config = typing.get_type_hints(factory)["config"]
        _print_entry(name, factory.__doc__ or "", config, f"kind: {factory.kind}")
    print(
        "avalanche.<Benchmark>\n    an avalanche-lib benchmark (SplitMNIST, SplitCIFAR10, ...) "
        "from a local data_root\n"
    )
    return 0


def _print_entry(name: str, doc: str, config: type, extra: str) -> None:
    print(f"{name}    ({extra})")
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    if summary:
        print(f"    {summary}")
    for field, type_name, default, help_text in describe(config):
        print(f"    {field}: {type_name} = {default!r}    {help_text}")
    print()


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """The store and the filters: the same for `compare` and `report`."""
    parser.add_argument("--tracking-uri", help="MLflow store: sqlite:///PATH or a server's "
                        "http://HOST:PORT (default: $MLFLOW_TRACKING_URI or "
                        "sqlite:///mlflow.db)")  # fmt: skip
    parser.add_argument("--stream", action="append", help="only this stream (repeatable)")
    parser.add_argument("--strategy", action="append", help="only this strategy (repeatable)")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="CONDITION",
        help="only cells whose parameter meets it: train.lr=0.1, train.lr=0.1,0.05 (any of), "
        "train.lr!=0.1, train.lr<=0.1 (also <, >, >=); repeatable",
    )


def _where(items: list[str]) -> list:
    from forgetless.experiments.compare import parse_condition

    return [parse_condition(item) for item in items]


def _readable_store(tracking_uri: str | None) -> str:
    """The store a read-only command reads: probed fast, and never created."""
    from forgetless.experiments.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(uri, must_exist=True)
    return uri


def _grid_name(grid: str) -> str:
    """A grid named on the command line: its `name:`, or the `name:` in its YAML file."""
    from pathlib import Path

    import yaml

    path = Path(grid)
    if path.suffix not in (".yaml", ".yml"):
        return grid
    if not path.is_file():
        raise ConfigError(f"{grid}: no such grid file")
    name = (yaml.safe_load(path.read_text()) or {}).get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{grid}: the grid file has no `name:`")
    return name


def cmd_compare(args: argparse.Namespace) -> int:
    from forgetless.experiments.compare import compare_table, format_table

    uri = _readable_store(args.tracking_uri)
    names = list(dict.fromkeys(_grid_name(grid) for grid in args.grids))
    table = compare_table(uri, names, args.stream, args.strategy, _where(args.where),
                          args.sort)  # fmt: skip
    print(format_table(table))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import gc
    import os
    from pathlib import Path

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from forgetless.experiments import report

    gc.freeze()  # the modules just imported are never garbage: no collection scans them again
    fmt = args.format or ("markdown" if (args.out or "").endswith(".md") else "html")
    out = Path(args.out or f"{args.grid_name}-report.{'md' if fmt == 'markdown' else 'html'}")
    formats = _figure_formats(args.formats)
    uri = _readable_store(args.tracking_uri)
    built = report.build(uri, args.grid_name, args.stream, args.strategy, _where(args.where),
                         formats)  # fmt: skip
    page, folder, *others = report.write(built, out, fmt, Path(args.csv) if args.csv else None)
    figures = sum(len(section.images) for section in built.sections)
    print(f"wrote {page}")
    for section in built.sections:
        print(f"  {section.title}" + (f": {len(section.images)} figure(s)" if section.images
                                      else ""))  # fmt: skip
    print(f"wrote {folder}/: {figures} figure(s) as {', '.join(f.upper() for f in formats)}")
    for path in others:
        print(f"wrote {path}")
    if fmt == "html":
        print(f"open it in a browser: {out.resolve().as_uri()}")
    return 0


def _figure_formats(text: str) -> list[str]:
    """`--formats png,svg` as a list, PNG first: the page shows it, so it is always written."""
    from forgetless.experiments.plots import FORMATS

    asked = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in asked if f not in FORMATS]
    if unknown:
        raise ConfigError(f"--formats: {', '.join(unknown)} is not a figure format; give a "
                          f"comma-separated list of {', '.join(FORMATS)}")  # fmt: skip
    return ["png", *dict.fromkeys(f for f in asked if f != "png")]


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import socket
    from pathlib import Path

    import mlflow

    from forgetless.experiments.tracking import grid_experiment, share_charts_view

    uri = _readable_store(args.tracking_uri)
    served = uri.startswith(("http://", "https://"))
    url = (uri.rstrip("/") if served else f"http://127.0.0.1:{args.port}") + "/"
    charts = None
    if args.grid_name:
        # MLflow 3 opens an experiment on its GenAI overview; its runs are one tab further.
        tab = "/runs" if int(mlflow.__version__.split(".")[0]) >= 3 else ""
        experiment_id = grid_experiment(uri, args.grid_name).experiment_id
        url += f"#/experiments/{experiment_id}{tab}"
        charts = f"{url}?{share_charts_view(uri, experiment_id)}"
    if served:
        print(f"{uri} is an MLflow server: its UI is at {url}", flush=True)
    else:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", args.port)) == 0:
                raise ConfigError(f"--port {args.port}: already in use; pick another, e.g. "
                                  f"--port {args.port + 1}")  # fmt: skip
        print(f"MLflow UI on {uri}: {url}  (Ctrl-C to stop)", flush=True)
    if charts:
        print(f"the cells' charts by strategy (mean and band over seeds): {charts}", flush=True)
    if served:
        return 0
    # `mlflow server` is `mlflow ui` with --workers in every version; one worker and no
    # GenAI job runner start in seconds and are plenty for one person's browser.
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]  # fmt: skip
    if uri.startswith("sqlite:///"):  # runs logged through this UI keep artifacts by the store
        store = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        command += ["--artifacts-destination", str(store.parent / "mlartifacts")]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum: int, frame: object) -> None:  # the server and its workers with us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        stop(signal.SIGINT, None)
        server.wait()
        return 0


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "strategies": cmd_strategies,
    "streams": cmd_streams,
    "compare": cmd_compare,
    "report": cmd_report,
    "ui": cmd_ui,
}

if __name__ == "__main__":
    sys.exit(main())
