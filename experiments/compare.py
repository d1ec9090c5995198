"""Reading results back from MLflow: the compare table and the seed-group runs.

One aggregation serves the terminal table, the report and the group runs in the MLflow
UI, so they always agree: cells are grouped by (stream, strategy, grid point) and every
final metric gets a mean and a standard deviation over seeds.

A FINISHED cell may carry the tag `forgetless.flag`, the reason its numbers are not to be
believed (it diverged to chance accuracy, its weights are not finite): a diverged cell
forgets nothing because it learned nothing. A group is flagged when any of its cells is;
flagged groups are shown as such and ranked after every unflagged one, whatever the sort.

Several grids compare in one table: their cells are grouped within each grid, so a row
says which grid it comes from. MLflow is imported only to write (`log_seed_groups`): the
table is read without it (`tracking.read_cells`).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from forgetless.core.schema import ConfigError, suggest
from forgetless.experiments import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient

TAG = tracking.TAG
GROUP_KEYS = ["stream", "strategy", "variant"]
FLAG_TAG = f"{TAG}flag"
# MLflow nests a run under the run this tag names: a cell under its group run.
PARENT_TAG = "mlflow.parentRunId"
# Columns of the cell frame that are neither metrics nor parameters.
CELL_KEYS = ["grid"] + GROUP_KEYS + ["seed", "run_id", "flag"]
HEADLINE = ["avg_acc", "learning_acc", "forgetting", "bwt", "fwt", "train_time_s", "memory_bytes"]
# Shown after the headline when a grid logs them (editing and language-model streams).
EXTRA = ["reliability", "generalization", "locality", "edit_latency_s", "general_retention"]
# "Best" is the smallest value for these; the largest for every other metric.
LOWER_IS_BETTER = {"forgetting", "train_time_s", "memory_bytes", "edit_latency_s"}


def cell_frame(uri: str, grid_names: str | list[str]) -> pd.DataFrame:
    """One row per FINISHED cell: stream, strategy, variant, seed, its flag ("" when it has
    none), every final metric and parameter; and its grid when several are read."""
    rows = []
    names = [grid_names] if isinstance(grid_names, str) else grid_names
    for cell in tracking.read_cells(uri, names):
        tags = cell.tags
        row = {
            **({"grid": cell.grid} if len(names) > 1 else {}),
            "stream": tags[f"{TAG}stream"],
            "strategy": tags[f"{TAG}strategy"],
            "variant": tags.get(f"{TAG}variant", "-"),
            "seed": int(tags[f"{TAG}seed"]),
            "run_id": cell.run_id,
            "flag": tags.get(FLAG_TAG, "").strip(),
        }
        row.update({k[len("final/") :]: v for k, v in cell.final.items()})
        row.update({f"param:{k}": v for k, v in cell.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def group_keys(frame: pd.DataFrame) -> list[str]:
    """What tells groups apart: the grid too when several were read."""
    return ["grid", *GROUP_KEYS] if "grid" in frame else GROUP_KEYS


def metric_names(cells: pd.DataFrame) -> list[str]:
    """The final metrics the cells carry, without the `final/` prefix."""
    return [c for c in cells.columns if c not in CELL_KEYS and not c.startswith("param:")]


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per group; columns `<metric>_mean`, `<metric>_std`, `seeds`,
    and `flagged` (how many of its cells are flagged) with `flag` (their reasons, by seed).

    A metric unknown (NaN) for any seed is unknown for the group: a mean over the seeds
    that happen to have it would pass for a mean over all of them.
    """
    if "flag" not in cells:
        cells = cells.assign(flag="")
    keys = group_keys(cells)
    metric_columns = metric_names(cells)
    grouped = cells.groupby(keys, sort=False)
    unknown = cells[metric_columns].isna().groupby([cells[k] for k in keys], sort=False)
    unknown = unknown.any()
    mean = grouped[metric_columns].mean().mask(unknown).add_suffix("_mean")
    std = grouped[metric_columns].std(ddof=1).mask(unknown).add_suffix("_std")
    table = pd.concat([mean, std], axis=1)
    table["seeds"] = grouped.size()
    flagged = cells[cells["flag"] != ""].sort_values("seed")
    flagged = flagged.assign(reason="seed " + flagged["seed"].astype(str) + ": " + flagged["flag"])
    by_group = flagged.groupby(keys, sort=False)
    table["flagged"] = by_group.size().reindex(table.index, fill_value=0)
    table["flag"] = by_group["reason"].agg("; ".join).reindex(table.index, fill_value="")
    return table.reset_index()


def rank(table: pd.DataFrame, column: str, ascending: bool) -> pd.DataFrame:
    """Best first by `column`, every flagged group after every unflagged one, unknown
    values after known ones: a diverged or unmeasured group is never ranked best."""
    order = table.assign(_flagged=table["flagged"] > 0 if "flagged" in table else False)
    order = order.sort_values(["_flagged", column], ascending=[True, ascending],
                              na_position="last", kind="stable")  # fmt: skip
    return order.drop(columns="_flagged").reset_index(drop=True)


# `--where` conditions: PARAM=V (V may be a comma-separated list), PARAM!=V, <, <=, >, >=.
OPERATORS = ("<=", ">=", "!=", "=", "<", ">")
Condition = tuple[str, str, str]


def parse_condition(text: str) -> Condition:
    """'train.lr<=0.1' -> ('train.lr', '<=', '0.1'), naming the forms on a bad one."""
    found = [text.find(op) for op in OPERATORS if op in text]
    if not found or min(found) <= 0:
        raise ConfigError(
            f"--where {text!r}: expected PARAM=VALUE, PARAM=A,B (any of), PARAM!=VALUE or "
            "PARAM<VALUE (also <=, >, >=), e.g. train.lr<=0.1"
        )
    index = min(found)
    op = next(op for op in OPERATORS if text.find(op) == index)  # "<=" before "<"
    return text[:index], op, text[index + len(op) :]


def _matches(logged: object, op: str, wanted: str, where: str) -> bool:
    if op in ("=", "!="):
        hit = any(_same_value(logged, w) for w in wanted.split(","))
        return hit if op == "=" else not hit
    try:
        a, b = float(logged), float(wanted)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--where {where}: {op} compares numbers; {logged!r} is not one") from e
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def select(
    cells: pd.DataFrame,
    streams: list[str] | None = None,
    strategies: list[str] | None = None,
    where: dict[str, str] | list[Condition] | None = None,
) -> pd.DataFrame:
    """The cells of these streams and strategies whose parameters meet these conditions
    (a mapping means equality).

    A filter that matches nothing is an error naming what exists (with the closest name
    when it looks like a typo), so a typo is never mistaken for an empty result.
    """
    these = "these grids have" if "grid" in cells else "this grid has"
    for column, wanted in (("stream", streams), ("strategy", strategies)):
        if not wanted:
            continue
        missing = sorted(set(wanted) - set(cells[column]))
        if missing:
            have = sorted(set(cells[column]))
            raise ConfigError(
                f"--{column} {missing[0]}: no finished cell has it"
                f"{suggest(missing[0], have)}; {these} {', '.join(have)}"
            )
        cells = cells[cells[column].isin(wanted)]
    conditions = [(k, "=", v) for k, v in where.items()] if isinstance(where, dict) else where
    for key, op, value in conditions or []:
        column = f"param:{key}"
        if column not in cells:
            params = [c[len("param:") :] for c in cells.columns if c.startswith("param:")]
            close = difflib.get_close_matches(key, params, n=3)
            varying = [p for p in params if cells[f"param:{p}"].nunique() > 1]
            hint = f"did you mean {', '.join(close)}?" if close else (
                f"parameters that vary here: {', '.join(varying) or '(none)'}")  # fmt: skip
            raise ConfigError(f"--where {key}: no cell has parameter {key!r}; {hint}")
        where_text = f"{key}{op}{value}"
        keep = cells[column].map(
            lambda v, op=op, value=value, w=where_text: _matches(v, op, value, w)
        )
        if not keep.any():
            values = ", ".join(sorted(set(cells[column].astype(str))))
            raise ConfigError(f"--where {where_text}: no cell has it; values here: {values}")
        cells = cells[keep]
    return cells


def _same_value(logged: object, wanted: str) -> bool:
    """MLflow keeps params as strings: `train.lr=0.10` matches a logged `0.1`."""
    try:
        return float(logged) == float(wanted)
    except (TypeError, ValueError):
        return str(logged) == wanted


def compare_table(
    uri: str,
    grid_names: str | list[str],
    streams: list[str] | None = None,
    strategies: list[str] | None = None,
    where: dict[str, str] | list[Condition] | None = None,
    sort: str = "final/avg_acc",
) -> pd.DataFrame:
    """The aggregated table of one grid or several, filtered by stream / strategy /
    parameter values, best first (flagged groups last)."""
    cells = cell_frame(uri, grid_names)
    if cells.empty:
        return cells
    table = aggregate(select(cells, streams, strategies, where))
    key = sort.removeprefix("final/")
    column = key if key in table else f"{key}_mean"
    if column not in table:
        names = [f"final/{m}" for m in metric_names(cells)]
        per_step = " (per-experience metrics such as acc/exp_0 are curves, not final values)"
        grids = ", ".join(map(repr, [grid_names] if isinstance(grid_names, str) else grid_names))
        raise ConfigError(
            f"--sort {sort}: not a final metric of {grids}{suggest(sort, names)}"
            f"{per_step if not sort.startswith('final/') else ''}; these can sort: "
            f"{', '.join(names)}"
        )
    ascending = key.removesuffix("_mean").removesuffix("_std") in LOWER_IS_BETTER
    return rank(table, column, ascending)


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text: `mean ± std` per shown metric (the mean alone for one seed), "n/a"
    where a metric is unknown, and a `flag` column when any group is flagged."""
    out = table[[k for k in ("grid", *GROUP_KEYS) if k in table]].copy()
    for metric in HEADLINE + EXTRA:
        if f"{metric}_mean" not in table:
            continue
        out[metric] = [
            mean_std(m, s, n, 0 if metric == "memory_bytes" else 3)
            for m, s, n in zip(table[f"{metric}_mean"], table[f"{metric}_std"], table["seeds"])
        ]
    out["seeds"] = table["seeds"]
    if (out["variant"] == "-").all():
        out = out.drop(columns="variant")
    if "flagged" in table and (table["flagged"] > 0).any():
        out["flag"] = [
            f"FLAGGED ({k} of {n} seeds)" if k else ""
            for k, n in zip(table["flagged"], table["seeds"])
        ]
    return out


def mean_std(mean: float, std: float, seeds: int, digits: int) -> str:
    """`mean ± std` (the mean alone for one seed); "n/a" for an unknown value, never 0."""
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if seeds < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def flag_lines(table: pd.DataFrame) -> list[str]:
    """One line per flagged group: where, which strategy, and each flagged seed's reason."""
    rows = table[table["flagged"] > 0] if "flagged" in table else table.iloc[:0]
    grid = "grid" in table
    return [
        f"{f'{r.grid} / ' if grid else ''}{r.stream} / {group_label(r.strategy, r.variant)}: "
        f"{r.flag}"
        for r in rows.itertuples()
    ]


def format_table(table: pd.DataFrame) -> str:
    """`mean ± std` per headline metric, a row per stream x strategy (x grid point), then
    the reasons of the flagged groups, which are ranked last."""
    if table.empty:
        return "(no finished cells)"
    text = formatted(table).to_string(index=False)
    flags = flag_lines(table)
    if flags:
        text += "\n\nFLAGGED, ranked last whatever the sort (numbers not to be trusted):\n"
        text += "\n".join(f"  {line}" for line in flags)
    return text


def mean_accuracy_matrices(
    cells: pd.DataFrame, matrices: dict[str, np.ndarray]
) -> dict[tuple[str, str, str], np.ndarray]:
    """Per group (stream, strategy, variant), R averaged over its seeds: the accuracy matrix
    its group run carries. `matrices` maps a cell's run id to its R; a cell without one is
    left out, and a group without any has no entry."""
    means = {}
    for key, rows in cells.groupby(GROUP_KEYS, sort=False):
        found = [matrices[run_id] for run_id in rows["run_id"] if run_id in matrices]
        if found:
            means[key] = np.mean(found, axis=0)
    return means


def log_seed_groups(grid_run: tracking.GridRun, grid_name: str) -> None:
    """Replace the grid's group runs with fresh ones from every FINISHED cell (a flagged
    group's run carries `forgetless.flag` too), nest each cell run under its group run, and
    write the table with links to every cell run as the parent run's description, so the
    parent run shows what the grid found and leads to each of its cells.

    The new groups exist and hold their cells before the old ones are deleted, so that an
    interrupted rebuild leaves no cell nested under a deleted run; the next rebuild replaces
    whatever groups it finds. A group run holds only numbers computed from its cells, which
    keep everything they recorded, so deleting it loses nothing.
    """
    from mlflow import MlflowClient

    client = MlflowClient(grid_run.tracking_uri)
    old = {r.info.run_id for r in _group_runs(client, grid_run.experiment_id)}
    cells = cell_frame(grid_run.tracking_uri, grid_name)
    if not cells.empty:
        table = aggregate(cells)
        tracking.log_groups(grid_run, _group_values(table), _group_configs(cells))
        new = {
            tuple(run.data.tags.get(f"{TAG}{k}") for k in GROUP_KEYS): run.info.run_id
            for run in _group_runs(client, grid_run.experiment_id)
            if run.info.run_id not in old
        }
        # A group is missing only when another driver's rebuild deleted it meanwhile (a
        # server store has no lock); that driver's groups then hold the cells.
        flagged = table[table["flagged"] > 0]
        for _, row in flagged.iterrows():
            group = new.get(tuple(row[k] for k in GROUP_KEYS))
            if group:
                client.set_tag(group, FLAG_TAG, row["flag"][:5000])
        for cell in cells.itertuples():
            group = new.get(tuple(getattr(cell, k) for k in GROUP_KEYS))
            if group:
                client.set_tag(cell.run_id, PARENT_TAG, group)
        client.set_tag(grid_run.parent_run_id, "mlflow.note.content",
                       grid_note(grid_run.experiment_id, cells, table))  # fmt: skip
    for run_id in old:
        client.delete_run(run_id)


def _group_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`{TAG}role` = 'group'", max_results=5000)


def _group_values(table: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per group, its `<metric>_mean` and `_std` and its number of seeds."""
    groups = {}
    for _, row in table.iterrows():
        key = tuple(row[k] for k in GROUP_KEYS)
        groups[key] = {c: row[c] for c in table.columns if c.endswith(("_mean", "_std"))}
        groups[key]["seeds"] = int(row["seeds"])
    return groups


def _group_configs(cells: pd.DataFrame) -> dict[tuple[str, str, str], dict[str, str]]:
    """Per group, its first cell's parameters but the seed: what the group run carries."""
    configs = {}
    for key, rows in cells.groupby(GROUP_KEYS, sort=False):
        first = rows.iloc[0]
        configs[key] = {
            c[len("param:") :]: first[c]
            for c in rows.columns
            if c.startswith("param:") and c != "param:seed" and first[c] == first[c]
        }
    return configs


def grid_note(experiment_id: str, cells: pd.DataFrame, table: pd.DataFrame) -> str:
    """Markdown for the parent run: the table over seeds, then a link to every cell run."""
    link = "#/experiments/{}/runs/{}".format
    runs = cells.sort_values(GROUP_KEYS + ["seed"])
    lines = [
        "Final metrics, mean ± std over seeds (the group runs carry them as metrics):",
        "",
        formatted(rank(table, "avg_acc_mean", ascending=False)).to_markdown(
            index=False, disable_numparse=True
        ),
        "",
        *[f"Flagged: {line}" for line in flag_lines(table)],
        "Cell runs:",
        "",
    ]
    lines += [
        f"- [{r.stream} / {group_label(r.strategy, r.variant)} / seed {r.seed}]"
        f"({link(experiment_id, r.run_id)})"
        for r in runs.itertuples()
    ]
    return "\n".join(lines)


def group_label(strategy: str, variant: str) -> str:
    """A strategy's name in tables and legends, with its grid point when the grid has one."""
    return strategy if variant == "-" else f"{strategy} [{variant}]"
