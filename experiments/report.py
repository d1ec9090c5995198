"""The grid report: one file that answers "which strategy forgets least, and at what cost".

Built from MLflow alone (a local SQLite store or a server), on compare.py's frames, so
its table is the table of `forgetless compare` and of the group runs: final metrics over
seeds with the best per column marked, confidence intervals and paired tests over seeds,
the figures of plots.py, then the setup the runs recorded. A flagged group (a cell tagged
`forgetless.flag`, e.g. one that diverged to chance accuracy and so "forgets" nothing) is
listed with its reasons, ranked last, never marked best and never named in the headline.
HTML embeds its PNGs, so the report is one file to send or attach; markdown links them, for
READMEs. Both write every figure as PNG, SVG and PDF beside the report (the formats asked
for: the grid's runs in MLflow carry the PNG alone), and the final table as LaTeX
(booktabs), for papers.

Everything is read in a few batched calls: the cells with their metrics, tags and artifact
locations at once (`tracking.read_cells`), then each file straight from its location; the
per-step curves come from the accuracy matrices, not from metric histories. MLflow itself
is imported only for a server's artifacts or an editing grid's histories: its import alone
costs seconds; scipy not at all (Student's t for whole degrees of freedom is a short closed
form).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd

from forgetless.core.schema import ConfigError
from forgetless.experiments import compare, metrics, plots, tracking

log = logging.getLogger(__name__)

EDIT_METRICS = ["reliability", "generalization", "locality"]
TESTED = ["avg_acc", "forgetting"]  # the metrics the statistics section tests
# The two references every method sits between: training on each experience in turn with
# nothing to prevent forgetting, and joint training on everything seen (an oracle).
REFERENCES = {"naive": "lower bound", "cumulative": "upper bound, joint training"}
ORACLES = {"cumulative"}
SIGNIFICANT = 0.05
CONFIDENCE = 0.95
COMMIT_TAG = "mlflow.source.git.commit"
VERSION_TAG = f"{tracking.TAG}version."


@dataclass
class Section:
    key: str
    title: str
    text: str
    table: pd.DataFrame | None = None  # as shown: text cells
    bold: pd.DataFrame | None = None  # same shape as `table`: True where a value is best
    # (file stem, {"png": ..., "svg": ..., "pdf": ...}): one figure in every format
    images: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, text cells)
    code: str = ""  # preformatted text after the tables (the grid file)


@dataclass
class Report:
    grid: str
    meta: str
    sections: list[Section]
    table: pd.DataFrame  # numeric: what `--csv` writes
    cells: pd.DataFrame  # the cells reported on, one row each (compare.cell_frame's, labelled)
    recorded: Recorded  # their accuracy matrices and the files the Setup section read


def build(
    uri: str,
    grid_name: str,
    streams: list[str] | None = None,
    strategies: list[str] | None = None,
    where: dict[str, str] | None = None,
    formats: Sequence[str] = plots.FORMATS,
) -> Report:
    """Read the grid's finished cells and make every section of the report, each figure in
    `formats` (PNG, which the page shows, first): a paper wants SVG and PDF beside it, the
    grid's runs in MLflow only the PNG."""
    cells = compare.cell_frame(uri, grid_name)
    if cells.empty:
        raise ConfigError(
            f"grid {grid_name!r} in {uri} has no FINISHED cell runs yet; run it with "
            "`forgetless run GRID.yaml`, or look for the failed cells' `forgetless.error` tag"
        )
    cells = compare.select(cells, streams, strategies, where)
    table = compare.aggregate(cells)
    table = table.assign(_flagged=table["flagged"] > 0).sort_values(
        ["stream", "_flagged", "avg_acc_mean"], ascending=[True, True, False], na_position="last"
    )
    table = table.drop(columns="_flagged").reset_index(drop=True)
    table.insert(0, "label", [compare.group_label(*k) for k in zip(table.strategy, table.variant)])
    cells = cells.assign(
        label=[compare.group_label(*k) for k in zip(cells.strategy, cells.variant)]
    )
    styles = plots.styles(list(dict.fromkeys(table["label"])))
    recorded = read_recorded(uri, grid_name, cells)

    tested = {metric: seed_statistics(cells, metric) for metric in TESTED}
    sections = [at_a_glance(table, tested["avg_acc"])]
    if (cells["flag"] != "").any():
        sections.append(flagged_section(cells))
    sections += [final_table(table), statistics_section(tested)]
    figures = {key: Section(key, title, text) for key, title, text in FIGURES}
    drawn = []  # (section key, file stem, figure)
    for stream, rows in table.groupby("stream", sort=False):
        stream_cells = cells[cells["stream"] == stream]
        for key, fig in stream_figures(uri, stream, rows, stream_cells, recorded, styles).items():
            drawn.append((key, f"{key}-{slug(stream)}", fig))
    rendered = plots.render_all([fig for *_, fig in drawn], formats)
    for (key, name, _), files in zip(drawn, rendered):
        figures[key].images.append((name, files))
    sections += [s for s in figures.values() if s.images]
    sections.append(setup_section(cells, recorded))

    seeds = sorted(cells["seed"].unique())
    meta = (
        f"{len(cells)} finished cells of grid {grid_name!r}: "
        f"{', '.join(table['stream'].unique())} x {table['label'].nunique()} strategies x "
        f"seeds {', '.join(map(str, seeds))}. Store: {uri}. "
        f"Made {time.strftime('%Y-%m-%d %H:%M')}."
    )
    return Report(grid_name, meta, sections, table.drop(columns="label"), cells, recorded)


@dataclass
class Recorded:
    """What the runs recorded beyond their final metrics, read once for figures and setup."""

    matrix_files: dict[str, dict]  # cell run id -> its accuracy_matrix.json (R, experiences, score)
    matrices: dict[str, np.ndarray]  # cell run id -> R
    manifests: dict[tuple[str, int], list[dict]]  # (stream, seed) -> the stream manifest
    commits: dict[str, str]  # cell run id -> the git commit it ran ("" when not recorded)
    versions: dict[str, str]  # package -> its version(s) over the cells
    grid_file: str  # the grid as submitted (the newest cell's parent run's grid.yaml), or ""


def read_recorded(uri: str, grid_name: str, cells: pd.DataFrame) -> Recorded:
    """The cells' tags and files, and the grid file of their latest submission.

    Tags and artifact locations come from `tracking.read_cells` (on a SQLite store, a few
    queries without importing MLflow); the files are read in parallel, straight from a local
    artifact store. A stream's manifest depends on the seed (its class order), not on the
    strategy: one per (stream, seed). The grid file is the parent run's `grid.yaml`: its id
    is the newest cell's `forgetless.driver` (its MLflow parent is its group run), and MLflow
    keeps a run's files at `<experiment location>/<run id>/artifacts`, beside its cells'.
    """
    records = {r.run_id: r for r in tracking.read_cells(uri, [grid_name])}
    chosen = [records[r] for r in cells["run_id"] if r in records]
    firsts = cells.drop_duplicates(["stream", "seed"])
    firsts = firsts[firsts["run_id"].isin(records)]
    wanted = [(r.artifact_uri, "accuracy_matrix.json") for r in chosen]
    wanted += [(records[r].artifact_uri, "stream_manifest.json") for r in firsts["run_id"]]
    newest = next((r for r in records.values() if r.run_id in set(cells["run_id"])), None)
    parent = newest.tags.get(f"{tracking.TAG}driver", "") if newest else ""
    if parent and f"/{newest.run_id}/" in newest.artifact_uri:
        wanted.append((newest.artifact_uri.replace(f"/{newest.run_id}/", f"/{parent}/"),
                       "grid.yaml"))  # fmt: skip
    texts = read_artifacts(uri, wanted)
    matrix_files = {r.run_id: json.loads(t) for r, t in zip(chosen, texts) if t is not None}
    manifests = {(row.stream, row.seed): json.loads(t)["experiences"]
                 for row, t in zip(firsts.itertuples(), texts[len(chosen) :])
                 if t is not None}  # fmt: skip
    grid_file = texts[-1] if len(wanted) > len(chosen) + len(firsts) else None
    return Recorded(
        matrix_files,
        {run_id: np.asarray(file["R"], dtype=float) for run_id, file in matrix_files.items()},
        manifests,
        {r.run_id: r.tags.get(COMMIT_TAG, "") for r in chosen},
        _versions([r.tags for r in chosen]),
        grid_file or "",
    )


def _versions(tags: list[dict[str, str]]) -> dict[str, str]:
    """package -> its version, or each version with its number of cells when they differ."""
    found: dict[str, list[str]] = {}
    for run_tags in tags:
        for key, value in run_tags.items():
            if key.startswith(VERSION_TAG):
                found.setdefault(key[len(VERSION_TAG) :], []).append(value)
    return {
        package: "; ".join(
            v if len(set(values)) == 1 else f"{v} ({values.count(v)} cells)"
            for v in dict.fromkeys(values)
        )
        for package, values in found.items()
    }


def read_artifacts(uri: str, wanted: list[tuple[str, str]]) -> list[str | None]:
    """The text of each (run artifact URI, path in it); None, with a warning, for a file the
    run does not have. A local artifact store (`file:` URIs, beside a SQLite store) is read
    as files; any other is downloaded through MLflow, in parallel, as each file is a round
    trip to the server."""

    def read(index: int, root: str, path: str, folder: str) -> str | None:
        try:
            if urlparse(root).scheme in ("file", ""):
                return Path(url2pathname(urlparse(root).path), path).read_text(encoding="utf-8")
            from mlflow.artifacts import download_artifacts

            target = Path(folder, str(index))
            target.mkdir()
            local = download_artifacts(artifact_uri=f"{root}/{path}", dst_path=str(target),
                                       tracking_uri=uri)  # fmt: skip
            return Path(local).read_text(encoding="utf-8")
        except Exception as e:  # noqa: BLE001 - MLflow's or the file system's: left out
            log.warning("%s/%s: not readable (%s); left out of the report", root, path, e)
            return None

    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(read, i, root, path, folder) for i, (root, path) in enumerate(wanted)]
        return [job.result() for job in jobs]


def stream_figures(
    uri: str,
    stream: str,
    rows: pd.DataFrame,
    cells: pd.DataFrame,
    recorded: Recorded,
    styles: dict[str, plots.Style],
) -> dict[str, plots.Figure]:
    """The figures of one stream, keyed by the section they belong to."""
    order = list(rows["label"])
    manifest = next((m for (s, _), m in sorted(recorded.manifests.items()) if s == stream), [])
    known = rows.dropna(subset=["memory_bytes_mean"])
    unknown = sorted(set(rows["label"]) - set(known["label"]))
    memory_title = f"{stream}: accuracy vs memory" + (
        f" (memory unknown, not drawn: {', '.join(unknown)})" if unknown else ""
    )
    figures = {
        "curves": average_accuracy_figure(stream, cells, order, recorded.matrices, styles),
        "heatmaps": heatmaps_figure(stream, cells, order, recorded),
        "tradeoff": plots.trade_off(
            seed_points(cells, order, "learning_acc", "forgetting"),
            styles,
            "learning accuracy (plasticity)",
            "forgetting (lower is more stable)",
            f"{stream}: stability vs plasticity",
            better="lower right",
        ),
        "memory": plots.trade_off(
            seed_points(cells, list(known["label"]), "memory_bytes", "avg_acc"),
            styles,
            "strategy memory beyond the model (symlog)",
            "final average accuracy",
            memory_title,
            better="upper left",
            memory_axis=True,
        )
        if len(known)
        else None,
        "time": plots.bars(
            {label: seed_values(cells, label, "train_time_s") for label in order},
            styles,
            "training time per cell (s)",
            f"{stream}: training time",
        ),
        "editing": editing_figure(uri, stream, cells, order, styles, manifest),
    }
    return {key: fig for key, fig in figures.items() if fig is not None}


# (key, title, what the section shows): the text printed above each figure.
FIGURES = [
    (
        "curves",
        "Average accuracy after every experience",
        "A_i, the mean accuracy over the experiences seen so far, after training on "
        "experience i (numbered from 0, as the MLflow step of the metrics logged after it): "
        "the line is the mean over seeds, the band ± one sample std, each hollow marker one "
        "seed. A strategy that forgets falls away from the top as experiences accumulate.",
    ),
    (
        "heatmaps",
        "Accuracy matrices",
        "R[i][j], the accuracy on experience j (column) after training through experience i "
        "(row), numbered from 0 as the MLflow steps; the axes name each experience's classes "
        "when every seed saw them in the same order (else the Setup lists each seed's). Per "
        "strategy the mean over seeds (one colour scale for all) and below it the sample std "
        "over seeds (another scale): a bright std cell is where seeds disagree. The diagonal "
        "is how well each experience was learned; a dark area below it is forgetting.",
    ),
    (
        "tradeoff",
        "Stability vs plasticity",
        "Learning accuracy (mean of the diagonal R[j][j]: how well each new experience is "
        "learned) against forgetting (mean drop from the best accuracy ever reached on an "
        "experience): each seed hollow, the mean filled with ± std bars. Lower right is better.",
    ),
    (
        "memory",
        "Accuracy vs memory",
        "What the final average accuracy costs in memory: what a strategy holds beyond the "
        "model (replay buffers, importance weights, old models), in KB and MB of 1024 bytes. "
        "The axis is symlog so 0 bytes shows. Each seed hollow, the mean filled with ± std "
        "bars. Upper left is better.",
    ),
    (
        "time",
        "Training time",
        "Training time per cell, summed over experiences (evaluation excluded): mean over "
        "seeds, whisker ± std, each seed a hollow marker.",
    ),
    (
        "editing",
        "Editing: reliability, generalization, locality",
        "After every edit batch, against the number of edits applied (from the stream "
        "manifest): reliability (the edit prompt gives the new target), generalization "
        "(paraphrases do) and locality (unrelated prompts keep their answers). Mean over "
        "seeds, band ± std, each seed a hollow marker.",
    ),
]


def at_a_glance(table: pd.DataFrame, versus: pd.DataFrame | None = None) -> Section:
    """Per stream, the methods from least to most forgetting, each beside what it costs,
    between the references: naive (the lower bound) and cumulative (joint training, the
    upper bound), which are marked and never named best.

    Only unflagged groups are named best: a cell that diverged to chance accuracy forgets
    nothing because it learned nothing, and must not headline the report. `versus` (the
    seed statistics of avg_acc) says which methods are no better than naive.
    """
    lines = []
    for stream, rows in table.groupby("stream", sort=False):
        ranked = rows[(rows["flagged"] == 0) & ~rows["strategy"].isin(REFERENCES)]
        stable = _best(ranked, "forgetting_mean", lowest=True)
        accurate = _best(ranked, "avg_acc_mean", lowest=False)
        if stable is None or accurate is None:
            line = f"{stream}: no unflagged method besides the references to rank"
        else:
            line = (
                f"{stream}: of the methods, {stable.label} forgets least "
                f"({stable.forgetting_mean:.3f}), at {_bytes(stable.memory_bytes_mean)} of "
                f"memory and {_number(stable.train_time_s_mean, '.1f')} s of training per "
                f"cell; {accurate.label} ends most accurate ({accurate.avg_acc_mean:.3f})"
            )
        references = rows[rows["strategy"].isin(REFERENCES) & (rows["flagged"] == 0)]
        bounds = [f"{r.label} ({REFERENCES[r.strategy]}) {r.avg_acc_mean:.3f}"
                  for r in references.itertuples()]  # fmt: skip
        if bounds:
            line += f". Final accuracy of the references: {'; '.join(bounds)}"
        if versus is not None:
            weak = _no_better_than_naive(versus[versus["stream"] == stream])
            if weak:
                line += (f". No better than naive in final accuracy (paired t-test, p ≥ "
                         f"{SIGNIFICANT}, or lower): {', '.join(weak)}")  # fmt: skip
        flagged = rows.loc[rows["flagged"] > 0, "label"]
        if len(flagged):
            line += f". Flagged, so not ranked (see Flagged cells): {', '.join(flagged)}"
        lines.append(line + ".")
    shown = formatted(table)
    keys = [c for c in compare.GROUP_KEYS if c in shown]
    order = (
        table.assign(_flagged=table["flagged"] > 0)
        .sort_values(["stream", "_flagged", "forgetting_mean"], na_position="last")
        .index
    )
    columns = keys + ["forgetting", "avg_acc", "memory", "train_time_s"]
    columns += ["flag"] if "flag" in shown else []
    text = "\n\n".join(lines) + (
        "\n\nForgetting, least first (flagged groups last), beside its costs "
        "(mean ± std over seeds; n/a: not known for that strategy):"
    )
    return Section("glance", "At a glance", text, shown.loc[order, columns])


def _no_better_than_naive(stats_rows: pd.DataFrame) -> list[str]:
    """The methods whose final accuracy is not significantly above naive's."""
    out = []
    for r in stats_rows.itertuples():
        if r.strategy in REFERENCES or r.flagged or np.isnan(r.naive_diff):
            continue
        if r.naive_diff <= 0 or not r.naive_p < SIGNIFICANT:
            out.append(compare.group_label(r.strategy, r.variant))
    return out


def _best(rows: pd.DataFrame, column: str, lowest: bool) -> pd.Series | None:
    """The row with the best known value of `column`, or None when no row has one."""
    known = rows[column].dropna()
    if known.empty:
        return None
    return rows.loc[known.idxmin() if lowest else known.idxmax()]


def _number(value: float, spec: str) -> str:
    return "n/a" if pd.isna(value) else format(value, spec)


def _bytes(value: float) -> str:
    """Memory in words: unknown is "n/a", never a 0 that reads as "holds nothing"."""
    return "an unknown amount (n/a)" if pd.isna(value) else plots.memory_text(value)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """compare's text table with memory in B, KB or MB (a `memory` column), as the figures
    show it; compare's terminal table and the CSV keep bytes."""
    shown = compare.formatted(table)
    if "memory_bytes" in shown:
        shown["memory_bytes"] = [
            plots.memory_text(mean, std if seeds > 1 else None)
            for mean, std, seeds in zip(
                table["memory_bytes_mean"], table["memory_bytes_std"], table["seeds"]
            )
        ]
    return shown.rename(columns={"memory_bytes": "memory"})


def flagged_section(cells: pd.DataFrame) -> Section:
    """Every flagged cell with its reason and run id."""
    flagged = cells[cells["flag"] != ""].sort_values(["stream", "label", "seed"])
    shown = pd.DataFrame(
        {
            "stream": flagged["stream"],
            "strategy": flagged["label"],
            "seed": flagged["seed"].astype(str),
            "reason": flagged["flag"],
            "run": flagged["run_id"],
        }
    )
    text = (
        f"{len(flagged)} finished cell(s) carry a `forgetless.flag`: their numbers are not "
        "to be trusted (a cell that diverged to chance accuracy forgets nothing because it "
        "learned nothing). A group with any flagged cell is marked FLAGGED in the tables, "
        "ranked after every unflagged group, never bold and never named best above."
    )
    return Section("flagged", "Flagged cells", text, shown.reset_index(drop=True))


def final_table(table: pd.DataFrame) -> Section:
    shown = formatted(table)
    bold = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    for column in shown.columns:
        metric = "memory_bytes" if column == "memory" else column
        if f"{metric}_mean" not in table:
            continue
        values = table[f"{metric}_mean"].round(12)
        ranked = values.where(table["flagged"] == 0)  # a flagged group is never the best
        best = ranked.groupby(table["stream"]).transform(
            "min" if metric in compare.LOWER_IS_BETTER else "max"
        )
        varies = values.groupby(table["stream"]).transform("nunique") > 1
        bold[column] = (ranked == best) & varies
    text = (
        "Each cell's final metrics, mean ± sample std over seeds (ddof=1, n in the seeds "
        "column, as the group runs in MLflow carry it). Bold: the best value of its column "
        "within its stream (lowest forgetting, training time, memory and edit latency; "
        "highest otherwise) among the unflagged groups; n/a: not known for that strategy; "
        "memory in KB and MB of 1024 bytes. "
        "Definitions in the README's Metrics section; bwt and fwt: backward and forward transfer. "
        "In a class-incremental stream fwt depends only on the untrained model (no strategy "
        "predicts a class before it has seen it), so it says nothing of the strategy there."
    )
    return Section("table", "Final metrics over seeds", text, shown, bold)


def seed_statistics(
    cells: pd.DataFrame, metric: str, confidence: float = CONFIDENCE
) -> pd.DataFrame:
    """Per group: a t-based confidence interval of the mean over seeds, and paired t-tests
    against naive and against the best non-oracle group of its stream (cumulative, joint
    training, is an upper bound, not a competitor) over the seeds both ran.

    Seeds pair because a seed fixes the class order and the initialisation for every
    strategy, so the paired test removes that shared variation. The interval uses the
    sample std (n - 1) and Student's t with n - 1 degrees of freedom: it needs two seeds.
    The test needs two shared seeds whose differences are not all equal (else t is not
    finite); p-values are two-sided and not corrected for multiple comparisons. A flagged
    group (any cell with a `flag`) is never the best: it is ranked after the unflagged ones,
    and a stream whose groups are all flagged has no best and no tests.
    """
    by_seed = cells.pivot(index="seed", columns=compare.GROUP_KEYS, values=metric)
    flags = cells["flag"] if "flag" in cells else pd.Series("", index=cells.index)
    flagged = set(cells.loc[flags != "", compare.GROUP_KEYS].itertuples(index=False, name=None))
    rows = []
    for key in by_seed.columns:
        values = by_seed[key].dropna().to_numpy()
        n, mean, half = len(values), values.mean(), np.nan
        if n >= 2:
            t = student_t_quantile(confidence, n - 1)
            half = t * values.std(ddof=1) / np.sqrt(n)
        rows.append(
            {
                **dict(zip(compare.GROUP_KEYS, key)),
                "seeds": n,
                "mean": mean,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "flagged": tuple(key) in flagged,
            }
        )
    lower = metric in compare.LOWER_IS_BETTER
    frame = pd.DataFrame(rows).sort_values(
        ["stream", "flagged", "mean"], ascending=[True, True, lower], ignore_index=True
    )
    frame["best"], frame["pairs"], frame["diff"], frame["p_value"] = "", 0, np.nan, np.nan
    frame["naive_diff"], frame["naive_p"] = np.nan, np.nan

    columns = {key: by_seed[key].to_numpy(dtype=float) for key in by_seed.columns}

    def paired(i: int, key: tuple) -> tuple[int, float, float]:
        this, other = columns[tuple(frame.loc[i, compare.GROUP_KEYS])], columns[key]
        both = ~np.isnan(this) & ~np.isnan(other)
        differences = this[both] - other[both]
        diff = differences.mean() if len(differences) else np.nan
        tested = len(differences) >= 2 and np.ptp(differences) > 1e-12
        return len(differences), diff, paired_t_test(differences) if tested else np.nan

    for _, group in frame.groupby("stream", sort=False):
        naive = group.index[group["strategy"] == "naive"]
        if len(naive):
            naive_key = tuple(frame.loc[naive[0], compare.GROUP_KEYS])
            for i in group.index.drop(naive[0]):
                _, frame.loc[i, "naive_diff"], frame.loc[i, "naive_p"] = paired(i, naive_key)
        candidates = group.index[~group["flagged"] & ~group["strategy"].isin(ORACLES)]
        if not len(candidates):
            continue
        best = candidates[0]
        best_key = tuple(frame.loc[best, compare.GROUP_KEYS])
        frame.loc[group.index, "best"] = compare.group_label(*best_key[1:])
        for i in group.index.drop(best):
            frame.loc[i, "pairs"], frame.loc[i, "diff"], frame.loc[i, "p_value"] = paired(
                i, best_key
            )
    return frame


def paired_t_test(differences: np.ndarray) -> float:
    """The two-sided p-value of a paired t-test on these differences (scipy's ttest_rel)."""
    n = len(differences)
    t = differences.mean() / (differences.std(ddof=1) / np.sqrt(n))
    return 1.0 - _t_central_mass(float(t), n - 1)


def student_t_quantile(confidence: float, dof: int) -> float:
    """The t whose interval [-t, t] holds `confidence` of Student's t with `dof` degrees of
    freedom (the 0.975 quantile for 95%), by bisection on the angle of `_t_central_mass`."""
    low, high = 0.0, math.pi / 2
    for _ in range(60):
        middle = (low + high) / 2
        if _t_central_mass(math.tan(middle) * math.sqrt(dof), dof) < confidence:
            low = middle
        else:
            high = middle
    return math.tan((low + high) / 2) * math.sqrt(dof)


def _t_central_mass(t: float, dof: int) -> float:
    """P(|T| <= |t|) for Student's t with a whole number `dof` of degrees of freedom, in closed
    form (Abramowitz and Stegun 26.7.3 and 26.7.4): a seed count is whole, and scipy, which
    computes it for any degrees of freedom, is a fifth of the report's import time."""
    theta = math.atan(abs(t) / math.sqrt(dof))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2 == 0:  # sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(dof-2) θ)
        term = total = 1.0
        for k in range(2, dof, 2):
            term *= (k - 1) / k * cos2
            total += term
        return sin * total
    total = 0.0  # 2/π (θ + sin θ (cos θ + 2/3 cos³θ + ... up to cos^(dof-2) θ)); θ alone for 1
    if dof > 1:
        term = total = math.sqrt(cos2)
        for k in range(3, dof, 2):
            term *= (k - 1) / k * cos2
            total += term
    return 2 / math.pi * (theta + sin * total)


def statistics_section(tested: dict[str, pd.DataFrame]) -> Section:
    """The `seed_statistics` of each TESTED metric as one table."""
    rows = []
    for metric, statistics in tested.items():
        for r in statistics.itertuples():
            label = compare.group_label(r.strategy, r.variant)
            is_best = r.best == label
            shown = f"{label} ({REFERENCES[r.strategy]})" if r.strategy in REFERENCES else label
            rows.append(
                {
                    "metric": f"final/{metric}",
                    "stream": r.stream,
                    "strategy": f"{shown} (FLAGGED)" if r.flagged else shown,
                    "seeds": r.seeds,
                    "mean": f"{r.mean:.3f}",
                    f"{CONFIDENCE:.0%} CI": "–"
                    if np.isnan(r.ci_low)
                    else f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
                    "vs": "(best)" if is_best else r.best,
                    "paired Δ": "" if is_best or np.isnan(r.diff) else f"{r.diff:+.3f}",
                    "p (paired t)": "" if is_best else _p(r.p_value),
                    "Δ vs naive": "" if np.isnan(r.naive_diff) else f"{r.naive_diff:+.3f}",
                    "p vs naive": "" if np.isnan(r.naive_diff) else _p(r.naive_p),
                }
            )
    text = (
        f"Final average accuracy and forgetting: the mean over seeds with a {CONFIDENCE:.0%} "
        "confidence interval (Student's t, sample std), and each strategy against the best "
        "of its stream in a paired t-test over the seeds both ran (a seed gives every "
        "strategy the same class order and initialisation), and against naive, the lower "
        "bound. The best is the best method that is not an oracle: cumulative (joint "
        "training) is the upper bound every method aims at, not a competitor. Δ is the mean "
        "paired difference (this minus the other), p two-sided and uncorrected for multiple "
        "comparisons; – means too few seeds (an interval needs 2, a test 2 shared seeds with "
        "differences that vary). A flagged group is never the best."
    )
    return Section("statistics", "Statistics over seeds", text, pd.DataFrame(rows))


def _p(p: float) -> str:
    return "–" if np.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def seed_values(cells: pd.DataFrame, label: str, metric: str) -> np.ndarray:
    """A group's final `metric`, one value per seed, in seed order."""
    return cells[metric].to_numpy(dtype=float)[_seed_order(cells, label)]


def _seed_order(cells: pd.DataFrame, label: str) -> np.ndarray:
    """The positions of a group's cells in `cells`, in seed order: in numpy, as the figures
    ask for it dozens of times and a pandas selection and sort costs a hundred times more."""
    (rows,) = np.nonzero(cells["label"].to_numpy() == label)
    return rows[np.argsort(cells["seed"].to_numpy()[rows], kind="stable")]


def seed_points(
    cells: pd.DataFrame, order: list[str], x: str, y: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (x of each seed, y of each seed): what a trade-off plot draws."""
    return {label: (seed_values(cells, label, x), seed_values(cells, label, y)) for label in order}


def _group_matrices(
    cells: pd.DataFrame, label: str, matrices: dict[str, np.ndarray]
) -> list[np.ndarray]:
    runs = cells["run_id"].to_numpy()[_seed_order(cells, label)]
    return [matrices[r] for r in runs if r in matrices]


def average_accuracy_figure(
    stream: str,
    cells: pd.DataFrame,
    order: list[str],
    matrices: dict[str, np.ndarray],
    styles: dict[str, plots.Style],
) -> plots.Figure:
    """A_i after each experience i, per seed, from the accuracy matrices (no metric history
    to fetch: A_i is a function of R)."""
    curves = {}
    for label in order:
        Rs = _group_matrices(cells, label, matrices)
        if Rs:
            steps = np.array(
                [[metrics.average_accuracy_after(R, i) for i in range(len(R))] for R in Rs]
            )
            curves[label] = (np.arange(steps.shape[1]), steps)
    return plots.curve_panels(
        {"average accuracy A_i": curves}, styles, plots.EXPERIENCE_AXIS,
        f"{stream}: average accuracy",
    )  # fmt: skip


def heatmaps_figure(
    stream: str, cells: pd.DataFrame, order: list[str], recorded: Recorded
) -> plots.Figure:
    """Mean and sample std of R over seeds per strategy, the axes named by experience."""
    mean_R, std_R = {}, {}
    for label in order:
        Rs = np.array(_group_matrices(cells, label, recorded.matrices))
        if len(Rs):
            mean_R[label], std_R[label] = Rs.mean(axis=0), plots.sample_std(Rs)
    seeds = sorted(cells["seed"].unique())
    title = f"{stream}: accuracy matrix R[i][j] over {len(seeds)} seeds"
    return plots.heatmap_grid(mean_R, std_R, experience_ticks(recorded, stream, seeds), title)


def experience_ticks(recorded: Recorded, stream: str, seeds: list[int]) -> list[str] | None:
    """'i: classes' per experience when every seed's manifest gives the same ones (a fixed
    class order, or a stream whose experiences do not depend on the seed); None otherwise,
    and the axes show the experience numbers alone."""
    named = {tuple(_experience_name(e) for e in recorded.manifests.get((stream, s), []))
             for s in seeds}  # fmt: skip
    if len(named) != 1 or not next(iter(named)):
        return None
    return [f"{i}: {name}" for i, name in enumerate(next(iter(named)))]


def _experience_name(experience: dict) -> str:
    """Its classes when the manifest has them (e.g. '3,7'), else its name."""
    classes = experience.get("original_classes", experience.get("classes"))
    return ",".join(map(str, classes)) if classes else str(experience["name"])


def editing_figure(
    uri: str,
    stream: str,
    cells: pd.DataFrame,
    order: list[str],
    styles: dict[str, plots.Style],
    manifest: list[dict],
) -> plots.Figure | None:
    """Reliability, generalization and locality per edit batch, if the runs logged them (the
    final metrics say so: a grid that does not edit costs no metric-history query)."""
    if EDIT_METRICS[0] not in cells or cells[EDIT_METRICS[0]].isna().all():
        return None
    from mlflow import MlflowClient  # here: importing MLflow costs seconds every report

    client = MlflowClient(uri)
    edits = edits_applied(manifest)
    panels: dict[str, plots.Curves] = {}
    for metric in EDIT_METRICS:
        curves = {}
        for label in order:
            runs = cells.loc[cells["label"] == label].sort_values("seed")["run_id"]
            histories = [
                sorted((m.step, m.value) for m in client.get_metric_history(r, metric))
                for r in runs
            ]
            histories = [[v for _, v in h] for h in histories if h]
            if histories:
                T = min(len(h) for h in histories)
                values = np.array([h[:T] for h in histories])
                x = edits[:T] if len(edits) >= T else np.arange(T)
                curves[label] = (x, values)
        if curves:
            panels[metric] = curves
    return plots.curve_panels(panels, styles, "edits applied", f"{stream}: editing")


def edits_applied(manifest: list[dict]) -> np.ndarray:
    """Cumulative edit count after each experience, from a stream manifest."""
    return np.cumsum([e["train"] for e in manifest]).astype(int)


def setup_section(cells: pd.DataFrame, recorded: Recorded) -> Section:
    """What the numbers came from, as the runs recorded it: the grid file as submitted, each
    group's resolved settings (defaults filled in), the class order and test-set size of
    every experience per seed, the git commit of the cells and the package versions."""
    params = cells.filter(like="param:").rename(columns=lambda c: c[len("param:") :])
    params = params.drop(columns=["seed"], errors="ignore")
    constant = [c for c in params if params[c].nunique(dropna=False) == 1]
    shared = [c for c in constant if not c.startswith("strategy.")]
    common = pd.DataFrame({"setting": shared, "value": [str(params[c].iloc[0]) for c in shared]})
    varying = [c for c in params if c not in shared]
    groups = []
    for (stream, label), rows in cells.groupby(["stream", "label"], sort=False):
        first = params.loc[rows.index[0], varying]
        settings = [f"{k}={v}" for k, v in first.items() if v == v and k != "strategy.name"]
        groups.append({"stream": stream, "strategy": label,
                       "settings": ", ".join(settings) or "(none)"})  # fmt: skip
    experiences = []
    for (stream, seed), manifest in sorted(recorded.manifests.items()):
        row = {"stream": stream, "seed": str(seed)}
        for e in manifest:
            row[f"experience {e['index']}"] = f"{_experience_name(e)} ({e['test']} test)"
        experiences.append(row)
    commits = pd.Series([recorded.commits.get(r, "") for r in cells["run_id"]])
    known = commits[commits != ""].value_counts()
    commit_text = (
        "; ".join(f"{c} ({n} of {len(cells)} cells)" for c, n in known.items())
        if len(known)
        else "not recorded (the cells did not run from a git checkout)"
    )
    if len(known) and known.sum() < len(cells):
        commit_text += f"; not recorded for {len(cells) - known.sum()} cells"
    versions = pd.DataFrame(
        {"package": list(recorded.versions), "version": list(recorded.versions.values())}
    )
    text = (
        f"Git commit (`{COMMIT_TAG}` of the cell runs): {commit_text}.\n\n"
        f"Package versions (`{VERSION_TAG}*` of the cell runs): "
        + ("see the table." if len(versions) else "not recorded (cells run before forgetless "
           "logged them).")
        + "\n\nSettings are the cells' MLflow parameters, defaults filled in; the grid file "
        "below is as submitted (the latest parent run's `grid.yaml`)."
    )  # fmt: skip
    tables = [
        ("Settings of every cell", common),
        ("Each strategy's settings beyond those", pd.DataFrame(groups)),
        ("Each seed's experiences: classes (or name) and test-set size, numbered from 0 as "
         "the MLflow steps", pd.DataFrame(experiences).fillna("")),
    ]  # fmt: skip
    if len(versions):
        tables.append(("Package versions", versions))
    grid_file = recorded.grid_file or "(not recorded: the parent run has no grid.yaml)"
    return Section("setup", "Setup", text, tables=tables, code=grid_file)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.meta { color: #666; font-size: 0.9em; } p { max-width: 70em; line-height: 1.4; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.best { font-weight: bold; background: #e3f2e1; }
img { max-width: 100%; margin: 0.5em 0 0; display: block; }
p.files { font-size: 0.85em; margin: 0 0 1em; } pre { background: #f6f6f6; padding: 0.8em; }
nav a { margin-right: 1em; }
"""


def to_html(report: Report, files: str) -> str:
    """One self-contained page: tables from pandas, PNGs embedded as base64, each linked to
    its SVG and PDF in the folder `files` (relative to the page)."""
    title = f"forgetless report: {report.grid}"
    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in report.sections)
    body = []
    for s in report.sections:
        parts = [f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>']
        parts += [f"<p>{html.escape(p)}</p>" for p in s.text.split("\n\n")]
        if s.table is not None:
            styler = s.table.style.hide(axis="index")
            if s.bold is not None:
                styler = styler.set_td_classes(s.bold.replace({True: "best", False: ""}))
            parts.append(styler.to_html(table_attributes=f'class="{s.key}"'))
        for caption, table in s.tables:
            parts.append(f"<h3>{html.escape(caption)}</h3>")
            parts.append(table.to_html(index=False, classes=s.key, border=0))
        if s.code:
            parts.append(f"<pre>{html.escape(s.code)}</pre>")
        for name, data in s.images:
            source = base64.b64encode(data["png"]).decode("ascii")
            parts.append(f'<img alt="{name}" src="data:image/png;base64,{source}">')
            links = [f'<a href="{files}/{name}.{fmt}">{fmt.upper()}</a>' for fmt in data]
            parts.append(f'<p class="files">{" · ".join(links)}</p>')
        body.append("\n".join(parts) + "</section>")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(report.meta)}</p>'
        f"<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def to_markdown(report: Report, files: str) -> str:
    """Markdown with pipe tables (best values in bold), each figure's PNG linked as
    `files/<name>.png` with its SVG and PDF beside: READMEs and paper sources do not show
    embedded images."""
    lines = [f"# forgetless report: {report.grid}", "", report.meta, ""]
    for s in report.sections:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.table is not None:
            shown = s.table.astype(str)
            if s.bold is not None:
                shown = shown.mask(s.bold, "**" + shown + "**")
            lines += [shown.to_markdown(index=False, disable_numparse=True), ""]
        for caption, table in s.tables:
            text = table.astype(str).to_markdown(index=False, disable_numparse=True)
            lines += [f"### {caption}", "", text, ""]
        if s.code:
            lines += ["```yaml", s.code.rstrip("\n"), "```", ""]
        for name, data in s.images:
            others = ", ".join(f"[{fmt.upper()}]({files}/{name}.{fmt})" for fmt in data)
            lines += [f"![{name}]({files}/{name}.png)", "", others, ""]
    return "\n".join(lines)


def to_latex(report: Report) -> str:
    """The final-metrics table as a LaTeX table with booktabs rules (\\toprule, \\midrule,
    \\bottomrule: `\\usepackage{booktabs}`), the best values in bold, as in the report."""
    section = next(s for s in report.sections if s.key == "table")
    text_columns = compare.GROUP_KEYS + ["flag"]  # left-aligned; numbers right-aligned
    styler = (
        section.table.style.hide(axis="index")
        .format(escape="latex", formatter=lambda text: str(text).replace(" ± ", r" $\pm$ "))
        .format_index(escape="latex", axis=1)
        .apply(lambda _: section.bold.replace({True: "font-weight: bold;", False: ""}), axis=None)
    )
    return styler.to_latex(
        hrules=True,
        convert_css=True,
        column_format="".join("l" if c in text_columns else "r" for c in section.table),
        caption=f"forgetless grid {report.grid}: final metrics, mean $\\pm$ sample std over "
        "seeds; best of each column and stream in bold.",
        label=f"tab:{slug(report.grid)}",
        position="t",
    )


def write(report: Report, out: Path, fmt: str, csv: Path | None = None) -> list[Path]:
    """The report as `fmt` ("html" or "markdown") at `out`, every figure in each format it was
    rendered in (PNG, SVG, PDF) in `<out stem>_files/`, the final table as LaTeX at
    `<out stem>.tex`, and the table as CSV if asked. Returns what it wrote: the page, the
    figures' folder, the LaTeX table and the CSV."""
    folder = out.with_name(f"{out.stem}_files")
    folder.mkdir(parents=True, exist_ok=True)
    for section in report.sections:
        for name, data in section.images:
            for suffix, content in data.items():
                (folder / f"{name}.{suffix}").write_bytes(content)
    page = to_html(report, folder.name) if fmt == "html" else to_markdown(report, folder.name)
    out.write_text(page, encoding="utf-8")
    out.with_suffix(".tex").write_text(to_latex(report), encoding="utf-8")
    written = [out, folder, out.with_suffix(".tex")]
    if csv:
        report.table.to_csv(csv, index=False)
        written.append(csv)
    return written
