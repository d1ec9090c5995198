"""Reading results back from MLflow: the compare table and the seed-group runs.

One aggregation serves both, so the terminal table and the group runs in the MLflow
UI always agree: cells are grouped by (stream, strategy, grid point) and every final
metric gets a mean and a standard deviation over seeds.
"""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient

from forgetless.experiments import tracking

TAG = tracking.TAG
GROUP_KEYS = ["stream", "strategy", "variant"]
HEADLINE = ["avg_acc", "learning_acc", "forgetting", "bwt", "fwt", "train_time_s", "memory_bytes"]


def cell_frame(uri: str, grid_name: str) -> pd.DataFrame:
    """One row per FINISHED cell: stream, strategy, variant, seed and every final metric."""
    rows = []
    for run in tracking.cell_runs(uri, grid_name):
        tags = run.data.tags
        row = {
            "stream": tags[f"{TAG}stream"],
            "strategy": tags[f"{TAG}strategy"],
            "variant": tags.get(f"{TAG}variant", "-"),
            "seed": int(tags[f"{TAG}seed"]),
            "run_id": run.info.run_id,
        }
        row.update({k[len("final/") :]: v for k, v in run.data.metrics.items()
                    if k.startswith("final/")})  # fmt: skip
        row.update({f"param:{k}": v for k, v in run.data.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per group; columns `<metric>_mean`, `<metric>_std`, `seeds`."""
    metric_columns = [c for c in cells.columns if c not in GROUP_KEYS + ["seed", "run_id"]
                      and not c.startswith("param:")]  # fmt: skip
    grouped = cells.groupby(GROUP_KEYS, sort=False)
    mean = grouped[metric_columns].mean().add_suffix("_mean")
    std = grouped[metric_columns].std(ddof=0).add_suffix("_std")
    table = pd.concat([mean, std], axis=1)
    table["seeds"] = grouped.size()
    return table.reset_index()


def compare_table(
    uri: str,
    grid_name: str,
    stream: str | None = None,
    strategy: str | None = None,
    where: dict[str, str] | None = None,
    sort: str = "final/avg_acc",
) -> pd.DataFrame:
    """The aggregated table, filtered by stream / strategy / parameter values and sorted."""
    cells = cell_frame(uri, grid_name)
    if cells.empty:
        return cells
    if stream:
        cells = cells[cells["stream"] == stream]
    if strategy:
        cells = cells[cells["strategy"] == strategy]
    for key, value in (where or {}).items():
        column = f"param:{key}"
        if column not in cells:
            raise KeyError(f"--where {key}: no cell has parameter {key!r}")
        cells = cells[cells[column].astype(str) == value]
    table = aggregate(cells)
    key = sort.removeprefix("final/")
    column = key if key in table else f"{key}_mean"
    if column not in table:
        raise KeyError(
            f"--sort {sort}: no such metric; try one of final/{', final/'.join(HEADLINE)}"
        )
    return table.sort_values(column, ascending=False, ignore_index=True)


def format_table(table: pd.DataFrame) -> str:
    """`mean ± std` per headline metric, a row per stream x strategy (x grid point)."""
    if table.empty:
        return "(no finished cells)"
    out = table[GROUP_KEYS].copy()
    for metric in HEADLINE:
        if f"{metric}_mean" not in table:
            continue
        fmt = "{:.0f} ± {:.0f}" if metric == "memory_bytes" else "{:.3f} ± {:.3f}"
        out[metric] = [fmt.format(m, s) for m, s in
                       zip(table[f"{metric}_mean"], table[f"{metric}_std"])]  # fmt: skip
    out["seeds"] = table["seeds"]
    if (out["variant"] == "-").all():
        out = out.drop(columns="variant")
    return out.to_string(index=False)


def log_seed_groups(grid_run: tracking.GridRun, grid_name: str) -> None:
    """Replace the grid's group runs with fresh ones from every FINISHED cell."""
    client = MlflowClient(grid_run.tracking_uri)
    old = client.search_runs([grid_run.experiment_id], f"tags.`{TAG}role` = 'group'")
    for run in old:
        client.delete_run(run.info.run_id)
    cells = cell_frame(grid_run.tracking_uri, grid_name)
    if cells.empty:
        return
    table = aggregate(cells)
    groups = {}
    for _, row in table.iterrows():
        key = tuple(row[k] for k in GROUP_KEYS)
        groups[key] = {c: row[c] for c in table.columns if c.endswith(("_mean", "_std"))}
        groups[key]["seeds"] = int(row["seeds"])
    tracking.log_groups(grid_run, groups)
