"""The grid report: one file that answers "which strategy forgets least, and at what cost".

Built from MLflow alone (a local SQLite store or a server), on compare.py's frames, so
its table is the table of `forgetless compare` and of the group runs: final metrics over
seeds with the best per column marked, confidence intervals and paired tests over seeds,
then the figures of plots.py. A flagged group (a cell tagged `forgetless.flag`, e.g. one that
diverged to chance accuracy and so "forgets" nothing) is listed with its reasons, ranked
last, never marked best and never named in the headline. HTML embeds its images, so the
report is one file to send or attach; markdown writes them beside it, for papers and READMEs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from scipy import stats

from forgetless.core.schema import ConfigError
from forgetless.experiments import compare, metrics, plots

log = logging.getLogger(__name__)

EDIT_METRICS = ["reliability", "generalization", "locality"]
TESTED = ["avg_acc", "forgetting"]  # the metrics the statistics section tests
# The two references every method sits between: training on each experience in turn with
# nothing to prevent forgetting, and joint training on everything seen (an oracle).
REFERENCES = {"naive": "lower bound", "cumulative": "upper bound, joint training"}
ORACLES = {"cumulative"}
SIGNIFICANT = 0.05
CONFIDENCE = 0.95


@dataclass
class Section:
    key: str
    title: str
    text: str
    table: pd.DataFrame | None = None  # as shown: text cells
    bold: pd.DataFrame | None = None  # same shape as `table`: True where a value is best
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (file stem, PNG)


@dataclass
class Report:
    grid: str
    meta: str
    sections: list[Section]
    table: pd.DataFrame  # numeric: what `--csv` writes


def build(
    uri: str,
    grid_name: str,
    streams: list[str] | None = None,
    strategies: list[str] | None = None,
    where: dict[str, str] | None = None,
) -> Report:
    """Read the grid's finished cells and make every section of the report."""
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
    colors = plots.palette(list(dict.fromkeys(table["label"])))
    client = MlflowClient(uri)
    matrices = accuracy_matrices(client, list(cells["run_id"]))

    sections = [at_a_glance(table, seed_statistics(cells, "avg_acc"))]
    if (cells["flag"] != "").any():
        sections.append(flagged_section(cells))
    sections += [final_table(table), statistics_section(cells)]
    figures = {key: Section(key, title, text) for key, title, text in FIGURES}
    for stream, rows in table.groupby("stream", sort=False):
        stream_cells = cells[cells["stream"] == stream]
        drawn = stream_figures(client, stream, rows, stream_cells, matrices, colors)
        for key, fig in drawn.items():
            figures[key].images.append((f"{key}-{slug(stream)}", png(fig)))
    sections += [s for s in figures.values() if s.images]

    seeds = sorted(cells["seed"].unique())
    meta = (
        f"{len(cells)} finished cells of grid {grid_name!r}: "
        f"{', '.join(table['stream'].unique())} x {table['label'].nunique()} strategies x "
        f"seeds {', '.join(map(str, seeds))}. Store: {uri}. "
        f"Made {time.strftime('%Y-%m-%d %H:%M')}."
    )
    return Report(grid_name, meta, sections, table.drop(columns="label"))


def stream_figures(
    client: MlflowClient,
    stream: str,
    rows: pd.DataFrame,
    cells: pd.DataFrame,
    matrices: dict[str, np.ndarray],
    colors: dict,
) -> dict[str, plots.Figure]:
    """The figures of one stream, keyed by the section they belong to."""
    order = list(rows["label"])
    known = rows.dropna(subset=["memory_bytes_mean"])
    unknown = sorted(set(rows["label"]) - set(known["label"]))
    memory_title = f"{stream}: accuracy vs memory" + (
        f" (memory unknown, not drawn: {', '.join(unknown)})" if unknown else ""
    )
    figures = {
        "curves": average_accuracy_figure(stream, cells, order, matrices, colors),
        "heatmaps": heatmaps_figure(stream, cells, order, matrices),
        "tradeoff": plots.trade_off(
            points(rows, "learning_acc", "forgetting"),
            colors,
            "learning accuracy (plasticity)",
            "forgetting (lower is more stable)",
            f"{stream}: stability vs plasticity",
            better="lower right",
        ),
        "memory": plots.trade_off(
            points(known, "memory_bytes", "avg_acc"),
            colors,
            "strategy memory beyond the model (bytes, symlog)",
            "final average accuracy",
            memory_title,
            better="upper left",
            xscale="symlog",
        )
        if len(known)
        else None,
        "time": plots.bars(
            {r.label: (r.train_time_s_mean, r.train_time_s_std) for r in rows.itertuples()},
            colors,
            "training time per cell (s)",
            f"{stream}: training time",
        ),
    }
    figures["editing"] = editing_figure(client, stream, cells, order, colors)
    return {key: fig for key, fig in figures.items() if fig is not None}


# (key, title, what the section shows): the text printed above each figure.
FIGURES = [
    (
        "curves",
        "Average accuracy after every experience",
        "A_i, the mean accuracy over the experiences seen so far, after training on each "
        "experience: the line is the mean over seeds, the band ± one std. A strategy that "
        "forgets falls away from the top as experiences accumulate.",
    ),
    (
        "heatmaps",
        "Accuracy matrices",
        "R[i][j], the accuracy on experience j (column) after training through experience i "
        "(row), averaged over seeds, one panel per strategy on one colour scale. The diagonal "
        "is how well each experience was learned; a dark area below it is forgetting.",
    ),
    (
        "tradeoff",
        "Stability vs plasticity",
        "Learning accuracy (mean of the diagonal R[j][j]: how well each new experience is "
        "learned) against forgetting (mean drop from the best accuracy ever reached on an "
        "experience). Error bars: ± std over seeds. Lower right is better.",
    ),
    (
        "memory",
        "Accuracy vs memory",
        "What the final average accuracy costs in memory: the bytes a strategy holds beyond "
        "the model (replay buffers, importance weights, old models). The axis is symlog so "
        "0 bytes shows. Upper left is better.",
    ),
    (
        "time",
        "Training time",
        "Training time per cell, summed over experiences (evaluation excluded): mean over "
        "seeds, whisker ± std.",
    ),
    (
        "editing",
        "Editing: reliability, generalization, locality",
        "After every edit batch, against the number of edits applied (from the stream "
        "manifest): reliability (the edit prompt gives the new target), generalization "
        "(paraphrases do) and locality (unrelated prompts keep their answers). Mean over "
        "seeds, band ± std.",
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
    shown = compare.formatted(table)
    keys = [c for c in compare.GROUP_KEYS if c in shown]
    order = (
        table.assign(_flagged=table["flagged"] > 0)
        .sort_values(["stream", "_flagged", "forgetting_mean"], na_position="last")
        .index
    )
    columns = keys + ["forgetting", "avg_acc", "memory_bytes", "train_time_s"]
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
    return "an unknown amount (n/a)" if pd.isna(value) else f"{value:,.0f} bytes"


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
    shown = compare.formatted(table)
    bold = pd.DataFrame(False, index=shown.index, columns=shown.columns)
    for metric in shown.columns:
        if f"{metric}_mean" not in table:
            continue
        values = table[f"{metric}_mean"].round(12)
        ranked = values.where(table["flagged"] == 0)  # a flagged group is never the best
        best = ranked.groupby(table["stream"]).transform(
            "min" if metric in compare.LOWER_IS_BETTER else "max"
        )
        varies = values.groupby(table["stream"]).transform("nunique") > 1
        bold[metric] = (ranked == best) & varies
    text = (
        "Each cell's final metrics, mean ± sample std over seeds (ddof=1, n in the seeds "
        "column, as the group runs in MLflow carry it). Bold: the best value of its column "
        "within its stream (lowest forgetting, training time, memory and edit latency; "
        "highest otherwise) among the unflagged groups; n/a: not known for that strategy. "
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
            half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
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

    def paired(i: int, key: tuple) -> tuple[int, float, float]:
        pairs = by_seed[[tuple(frame.loc[i, compare.GROUP_KEYS]), key]].dropna()
        this, other = pairs.iloc[:, 0].to_numpy(), pairs.iloc[:, 1].to_numpy()
        diff = (this - other).mean() if len(pairs) else np.nan
        tested = len(pairs) >= 2 and np.ptp(this - other) > 1e-12
        return len(pairs), diff, stats.ttest_rel(this, other).pvalue if tested else np.nan

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


def statistics_section(cells: pd.DataFrame) -> Section:
    rows = []
    for metric in TESTED:
        for r in seed_statistics(cells, metric).itertuples():
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


def accuracy_matrices(client: MlflowClient, run_ids: list[str]) -> dict[str, np.ndarray]:
    """run id -> R from the run's `accuracy_matrix.json`; a run without it is left out."""
    matrices = {}
    with tempfile.TemporaryDirectory() as folder:
        for run_id in run_ids:
            target = Path(folder, run_id)
            target.mkdir()
            try:
                path = client.download_artifacts(run_id, "accuracy_matrix.json", str(target))
            except MlflowException as e:
                log.warning(
                    "run %s: no accuracy_matrix.json (%s); left out of the plots", run_id, e
                )
                continue
            matrices[run_id] = np.asarray(json.loads(Path(path).read_text())["R"], dtype=float)
    return matrices


def average_accuracy_figure(
    stream: str,
    cells: pd.DataFrame,
    order: list[str],
    matrices: dict[str, np.ndarray],
    colors: dict,
) -> plots.Figure:
    curves = {}
    for label in order:
        Rs = [matrices[r] for r in cells.loc[cells["label"] == label, "run_id"] if r in matrices]
        if Rs:
            steps = np.array(
                [[metrics.average_accuracy_after(R, i) for i in range(len(R))] for R in Rs]
            )
            x = np.arange(1, steps.shape[1] + 1)
            curves[label] = (x, steps.mean(axis=0), _sample_std(steps))
    return plots.curve_panels(
        {"average accuracy A_i": curves},
        colors,
        "experiences trained",
        f"{stream}: average accuracy",
    )


def heatmaps_figure(
    stream: str, cells: pd.DataFrame, order: list[str], matrices: dict[str, np.ndarray]
) -> plots.Figure:
    mean_R = {}
    for label in order:
        Rs = [matrices[r] for r in cells.loc[cells["label"] == label, "run_id"] if r in matrices]
        if Rs:
            mean_R[label] = np.mean(Rs, axis=0)
    seeds = cells["seed"].nunique()
    return plots.heatmap_row(mean_R, f"{stream}: accuracy matrix R[i][j], mean over {seeds} seeds")


def points(rows: pd.DataFrame, x: str, y: str) -> dict[str, tuple[float, float, float, float]]:
    return {
        r["label"]: (r[f"{x}_mean"], r[f"{x}_std"], r[f"{y}_mean"], r[f"{y}_std"])
        for _, r in rows.iterrows()
    }


def editing_figure(
    client: MlflowClient, stream: str, cells: pd.DataFrame, order: list[str], colors: dict
) -> plots.Figure | None:
    """Reliability, generalization and locality per edit batch, if the runs logged them."""
    first = cells["run_id"].iloc[0]
    if not client.get_metric_history(first, EDIT_METRICS[0]):
        return None
    edits = edits_applied(client, first)
    panels: dict[str, plots.Curves] = {}
    for metric in EDIT_METRICS:
        curves = {}
        for label in order:
            runs = cells.loc[cells["label"] == label, "run_id"]
            histories = [
                sorted((m.step, m.value) for m in client.get_metric_history(r, metric))
                for r in runs
            ]
            histories = [[v for _, v in h] for h in histories if h]
            if histories:
                T = min(len(h) for h in histories)
                values = np.array([h[:T] for h in histories])
                x = edits[:T] if len(edits) >= T else np.arange(1, T + 1)
                curves[label] = (x, values.mean(axis=0), _sample_std(values))
        if curves:
            panels[metric] = curves
    return plots.curve_panels(panels, colors, "edits applied", f"{stream}: editing")


def edits_applied(client: MlflowClient, run_id: str) -> np.ndarray:
    """Cumulative edit count after each experience, from the run's stream manifest."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, "stream_manifest.json", folder)
        except MlflowException:
            return np.array([], dtype=int)
        experiences = json.loads(Path(path).read_text())["experiences"]
    return np.cumsum([e["train"] for e in experiences])


def png(fig: plots.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
p.meta { color: #666; font-size: 0.9em; } p { max-width: 70em; line-height: 1.4; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.best { font-weight: bold; background: #e3f2e1; }
img { max-width: 100%; margin: 0.5em 0; display: block; }
nav a { margin-right: 1em; }
"""


def to_html(report: Report) -> str:
    """One self-contained page: tables from pandas, PNGs embedded as base64."""
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
        for name, data in s.images:
            source = base64.b64encode(data).decode("ascii")
            parts.append(f'<img alt="{name}" src="data:image/png;base64,{source}">')
        body.append("\n".join(parts) + "</section>")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>"
        f'<h1>{html.escape(title)}</h1><p class="meta">{html.escape(report.meta)}</p>'
        f"<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def to_markdown(report: Report, images: Path, link: str) -> str:
    """Markdown with pipe tables (best values in bold); the PNGs go to `images`, linked as
    `link/<name>.png`, since READMEs and paper sources do not show embedded images."""
    images.mkdir(parents=True, exist_ok=True)
    lines = [f"# forgetless report: {report.grid}", "", report.meta, ""]
    for s in report.sections:
        lines += [f"## {s.title}", "", s.text, ""]
        if s.table is not None:
            shown = s.table.astype(str)
            if s.bold is not None:
                shown = shown.mask(s.bold, "**" + shown + "**")
            lines += [shown.to_markdown(index=False, disable_numparse=True), ""]
        for name, data in s.images:
            (images / f"{name}.png").write_bytes(data)
            lines += [f"![{name}]({link}/{name}.png)", ""]
    return "\n".join(lines)


def write(report: Report, out: Path, fmt: str, csv: Path | None = None) -> None:
    """The report as `fmt` ("html" or "markdown") at `out`, and its table as CSV if asked."""
    if fmt == "html":
        out.write_text(to_html(report), encoding="utf-8")
    else:
        folder = out.with_name(f"{out.stem}_files")
        out.write_text(to_markdown(report, folder, folder.name), encoding="utf-8")
    if csv:
        report.table.to_csv(csv, index=False)


def _sample_std(values: np.ndarray) -> np.ndarray:
    """The sample std over seeds (axis 0), as in the tables; zero band for one seed."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
