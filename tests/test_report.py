"""The report and the compare command, read back from MLflow: sections, numbers, statistics."""

from __future__ import annotations

import base64
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from scipy import stats as scipy_stats

from forgetless.experiments import compare, report
from forgetless.experiments.cli import main
from forgetless.experiments.compare import HEADLINE, cell_frame, compare_table

FIGURE_SECTIONS = ["curves", "heatmaps", "tradeoff", "memory", "time"]
PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Section ids in order, the images and table rows inside each."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict[str, list]] = {}
        self.current: dict[str, list] | None = None
        self.in_body = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "section":
            self.current = self.sections.setdefault(attrs["id"], {"img": [], "tr": []})
        elif tag == "tbody":
            self.in_body = True
        elif self.current is not None and tag == "img":
            self.current["img"].append(attrs["src"])
        elif self.current is not None and tag == "tr" and self.in_body:
            self.current["tr"].append(attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "tbody":
            self.in_body = False


def markdown_table(text: str, heading: str) -> pd.DataFrame:
    """The first pipe table after `## heading`, as text cells."""
    lines = text.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = lines[start:end]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return pd.DataFrame(cells[2:], columns=cells[0])


def flagged_strategies(uri: str, name: str) -> set[str]:
    """Strategies with a cell the runner flagged (e.g. learnt no better than chance)."""
    cells = cell_frame(uri, name)
    return set(cells.loc[cells["flag"] != "", "strategy"])


def test_report_has_every_section_and_one_image_per_plot(finished_grid, tmp_path):
    uri, name = finished_grid
    out = tmp_path / "report.html"
    assert main(["report", name, "--tracking-uri", uri, "--out", str(out)]) == 0
    page = Page()
    page.feed(out.read_text())
    flagged = ["flagged"] if flagged_strategies(uri, name) else []
    expected = ["glance", *flagged, "table", "statistics", *FIGURE_SECTIONS, "setup"]
    assert list(page.sections) == expected  # no editing section: these runs do not edit
    for key in FIGURE_SECTIONS:
        (source,) = page.sections[key]["img"]  # one stream: one image per plot
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :]).startswith(PNG)
        # Beside the page, linked from it, the same figure as SVG and PDF.
        for suffix, magic in (("svg", b"<?xml"), ("pdf", b"%PDF")):
            link = f"report_files/{key}-split_digits.{suffix}"
            assert f'href="{link}"' in out.read_text()
            assert (tmp_path / link).read_bytes().startswith(magic)
    for key in ("glance", "table", "statistics", "setup"):
        assert page.sections[key]["img"] == []
    assert len(page.sections["table"]["tr"]) == 2  # naive, rehearsal
    assert len(page.sections["statistics"]["tr"]) == 4  # 2 strategies x (avg_acc, forgetting)
    assert "forgets least" in out.read_text()


def test_report_writes_the_formats_asked_and_prints_every_file(finished_grid, tmp_path, capsys):
    uri, name = finished_grid
    out = tmp_path / "paper.md"
    argv = ["report", name, "--tracking-uri", uri, "--out", str(out), "--formats", "png,svg"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for path in (out, tmp_path / "paper_files", tmp_path / "paper.tex"):
        assert path.exists() and f"wrote {path}" in printed
    figures = list((tmp_path / "paper_files").iterdir())
    assert {p.suffix for p in figures} == {".png", ".svg"}  # no PDF: not asked
    assert len(figures) == 2 * len(FIGURE_SECTIONS)
    assert main([*argv[:-1], "png,gif"]) == 2
    assert "--formats: gif is not a figure format" in capsys.readouterr().err


def test_markdown_table_numbers_equal_the_metrics_in_mlflow(finished_grid, tmp_path):
    uri, name = finished_grid
    out, csv = tmp_path / "report.md", tmp_path / "table.csv"
    argv = ["report", name, "--tracking-uri", uri, "--out", str(out), "--csv", str(csv)]
    assert main(argv) == 0
    text = out.read_text()
    table = markdown_table(text, "Final metrics over seeds").set_index("strategy")

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    groups = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'group'")
    assert len(groups) == 2
    for run in groups:
        row = table.loc[run.data.tags["forgetless.strategy"]]
        for metric in HEADLINE:
            mean = run.data.metrics[f"final/{metric}_mean"]
            std = run.data.metrics[f"final/{metric}_std"]
            if metric == "memory_bytes":  # naive holds nothing; rehearsal tens of KB (1024 B)
                kb = "0 ± 0 B" if mean == 0 else f"{mean / 1024:.1f} ± {std / 1024:.1f} KB"
                assert row["memory"].strip("*") == kb
                continue
            assert row[metric].strip("*") == f"{mean:.3f} ± {std:.3f}", metric
        assert row["seeds"] == "2"
    # The best final accuracy of the unflagged groups is bold, and only there.
    flagged = flagged_strategies(uri, name)
    ranked = [r for r in groups if r.data.tags["forgetless.strategy"] not in flagged]
    best = max(ranked, key=lambda r: r.data.metrics["final/avg_acc_mean"])
    column = table["avg_acc"]
    assert column[best.data.tags["forgetless.strategy"]].startswith("**")
    assert sum(v.startswith("**") for v in column) == 1
    # Every figure is a file beside the report, linked from it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == len(FIGURE_SECTIONS)
    for link in links:
        assert (out.parent / link).read_bytes().startswith(PNG)
        for suffix, magic in ((".svg", b"<?xml"), (".pdf", b"%PDF")):
            vector = Path(link).with_suffix(suffix).as_posix()
            assert f"]({vector})" in text
            assert (out.parent / vector).read_bytes().startswith(magic)
    # The CSV holds the unrounded numbers of the group runs.
    exported = pd.read_csv(csv).set_index("strategy")
    for run in groups:
        for key, value in run.data.metrics.items():
            assert exported.at[run.data.tags["forgetless.strategy"], key[len("final/") :]] == (
                pytest.approx(value)
            )


def test_seed_statistics_match_values_computed_by_hand():
    rows = []
    values = {"a": [0.80, 0.85, 0.90], "b": [0.70, 0.80, 0.75], "c": [0.70, 0.75, 0.80]}
    for strategy, scores in values.items():
        rows += [{"stream": "s", "strategy": strategy, "variant": "-", "seed": seed,
                  "avg_acc": v, "forgetting": 1 - v} for seed, v in enumerate(scores)]  # fmt: skip
    rows.append({"stream": "s", "strategy": "d", "variant": "-", "seed": 0, "avg_acc": 0.5,
                 "forgetting": 0.5})  # fmt: skip
    cells = pd.DataFrame(rows)
    stats = report.seed_statistics(cells, "avg_acc").set_index("strategy")

    # a: mean 0.85, sample std 0.05; t(0.975, 2 df) = 0.95 / sqrt(2 * 0.975 * 0.025).
    t_975 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t_975 == pytest.approx(4.302653, abs=1e-6)
    half = t_975 * 0.05 / math.sqrt(3)
    assert stats.at["a", "mean"] == pytest.approx(0.85)
    assert (stats.at["a", "ci_low"], stats.at["a", "ci_high"]) == pytest.approx(
        (0.85 - half, 0.85 + half)
    )
    assert list(stats["best"]) == ["a"] * 4
    assert np.isnan(stats.at["a", "p_value"])  # the best is not tested against itself
    # b - a by seed: -0.10, -0.05, -0.15: mean -0.10, sample std 0.05, t = -0.1 / (0.05 / sqrt 3)
    # and with 2 degrees of freedom the two-sided p is 1 - |t| / sqrt(t^2 + 2).
    t = -0.10 / (0.05 / math.sqrt(3))
    assert stats.at["b", "diff"] == pytest.approx(-0.10)
    assert stats.at["b", "pairs"] == 3
    assert stats.at["b", "p_value"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2))
    assert stats.at["b", "p_value"] == pytest.approx(0.074180, abs=1e-6)
    # c - a is -0.10 for every seed: t is not finite, so no p-value rather than a fake 0.
    assert stats.at["c", "diff"] == pytest.approx(-0.10)
    assert np.isnan(stats.at["c", "p_value"])
    # d ran one seed: no interval, one pair, no test.
    assert np.isnan(stats.at["d", "ci_low"]) and stats.at["d", "pairs"] == 1
    assert np.isnan(stats.at["d", "p_value"])

    # Forgetting: lower is better, so the best is a (forgetting 0.15) again.
    forgetting = report.seed_statistics(cells, "forgetting").set_index("strategy")
    assert list(forgetting.index[:1]) == ["a"] and set(forgetting["best"]) == {"a"}
    assert forgetting.at["b", "diff"] == pytest.approx(0.10)


def test_t_quantile_and_paired_p_value_equal_scipy_for_every_seed_count():
    rng = np.random.default_rng(0)
    for seeds in range(2, 21):  # degrees of freedom 1 to 19, odd and even closed forms
        assert report.student_t_quantile(0.95, seeds - 1) == pytest.approx(
            scipy_stats.t.ppf(0.975, seeds - 1), rel=1e-9
        )
        differences = rng.normal(0.3, 1.0, seeds)
        assert report.paired_t_test(differences) == pytest.approx(
            scipy_stats.ttest_1samp(differences, 0.0).pvalue, rel=1e-7
        )


def test_seed_statistics_never_take_a_flagged_group_as_the_best():
    rows = [{"stream": "s", "strategy": strategy, "variant": "-", "seed": seed, "avg_acc": acc,
             "flag": flag if seed == 0 else ""}
            for strategy, acc, flag in (("diverged", 0.9, "non-finite parameters"),
                                        ("a", 0.8, ""), ("b", 0.7, ""))
            for seed in (0, 1)]  # fmt: skip
    stats = report.seed_statistics(pd.DataFrame(rows), "avg_acc")
    # The highest mean is the diverged group's; one flagged seed flags the group: ranked last.
    assert list(stats["strategy"]) == ["a", "b", "diverged"]
    assert set(stats["best"]) == {"a"} and list(stats["flagged"]) == [False, False, True]
    # A stream of flagged groups only has no best and no tests.
    only = report.seed_statistics(pd.DataFrame([r for r in rows if r["strategy"] == "diverged"]),
                                  "avg_acc")  # fmt: skip
    assert list(only["best"]) == [""] and np.isnan(only["p_value"]).all()


def test_references_bound_the_ranking_and_methods_are_tested_against_naive():
    """cumulative (joint training) is never the best; each method is tested against naive
    and against the best method; a method no better than naive is said to be so."""
    values = {"naive": [0.20, 0.22, 0.19], "cumulative": [0.95, 0.96, 0.94],
              "ewc": [0.21, 0.20, 0.22], "rehearsal": [0.60, 0.66, 0.61]}  # fmt: skip
    cells = pd.DataFrame([
        {"stream": "s", "strategy": k, "variant": "-", "seed": seed, "avg_acc": v, "flag": "",
         "forgetting": 0.1, "memory_bytes": 0.0, "train_time_s": 1.0}
        for k, scores in values.items() for seed, v in enumerate(scores)
    ])  # fmt: skip
    stats = report.seed_statistics(cells, "avg_acc").set_index("strategy")
    assert set(stats["best"]) == {"rehearsal"}  # not cumulative, the higher
    ewc_vs_naive = np.array(values["ewc"]) - np.array(values["naive"])
    assert stats.at["ewc", "naive_diff"] == pytest.approx(ewc_vs_naive.mean())
    assert stats.at["ewc", "naive_p"] == pytest.approx(
        scipy_stats.ttest_rel(values["ewc"], values["naive"]).pvalue
    )
    assert np.isnan(stats.at["naive", "naive_diff"])

    table = compare.aggregate(cells)
    table.insert(0, "label", table["strategy"])
    glance = report.at_a_glance(table, report.seed_statistics(cells, "avg_acc")).text
    assert "cumulative (upper bound, joint training) 0.950" in glance
    assert "naive (lower bound) 0.203" in glance
    assert "rehearsal ends most accurate" in glance
    assert "No better than naive in final accuracy" in glance and ": ewc" in glance


def log_editing_grid(uri: str, name: str, artifacts: Path) -> None:
    """Two editors x two seeds, 3 edit batches of 4 edits each, logged with MLflow's API."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
    manifest = {"experiences": [{"index": i, "name": f"edits_{i}", "train": 4, "test": 4}
                                for i in range(3)]}  # fmt: skip
    for strategy, level in (("grace", 0.9), ("ft_l", 0.6)):
        for seed in (0, 1):
            run = client.create_run(experiment_id, run_name=f"facts/{strategy} seed={seed}", tags={
                "forgetless.role": "cell", "forgetless.stream": "facts",
                "forgetless.strategy": strategy, "forgetless.seed": str(seed),
                "forgetless.variant": "-", "forgetless.grid": name,
            })  # fmt: skip
            run_id = run.info.run_id
            steps = [
                Metric(key, value, 0, step)
                for step in range(3)
                for key, value in (("reliability", level - 0.1 * step),
                                   ("generalization", level - 0.2 * step),
                                   ("locality", 1.0 - 0.05 * step - 0.01 * seed))
            ]  # fmt: skip
            final = {"avg_acc": level, "learning_acc": level, "forgetting": 0.1, "bwt": -0.1,
                     "fwt": 0.0, "train_time_s": 1.0 + seed, "memory_bytes": 100.0,
                     "reliability": level - 0.2, "generalization": level - 0.4,
                     "locality": 0.9}  # fmt: skip
            steps += [Metric(f"final/{key}", value, 0, 0) for key, value in final.items()]
            client.log_batch(run_id, metrics=steps)
            R = np.tril(np.full((3, 3), level - 0.1 * seed))
            client.log_dict(run_id, {"experiences": ["e0", "e1", "e2"], "R": R.tolist(),
                                     "baseline": [0, 0, 0]}, "accuracy_matrix.json")  # fmt: skip
            client.log_dict(run_id, manifest, "stream_manifest.json")
            client.set_terminated(run_id, "FINISHED")


def test_editing_section_plots_edit_metrics_against_the_number_of_edits(tracking_uri, tmp_path):
    log_editing_grid(tracking_uri, "report-editing", tmp_path)
    built = report.build(tracking_uri, "report-editing")
    sections = {s.key: s for s in built.sections}
    assert [name for name, _ in sections["editing"].images] == ["editing-facts"]
    assert sections["editing"].images[0][1]["png"].startswith(PNG)
    table = sections["table"].table.set_index("strategy")
    assert table.at["grace", "reliability"] == "0.700 ± 0.000"
    cells = cell_frame(tracking_uri, "report-editing")
    recorded = report.read_recorded(tracking_uri, "report-editing", cells)
    manifest = recorded.manifests[("facts", 0)]
    assert [e["name"] for e in manifest] == ["edits_0", "edits_1", "edits_2"]
    assert list(report.edits_applied(manifest)) == [4, 8, 12]


def test_unknown_grid_names_the_grids_that_exist(finished_grid, capsys):
    uri, name = finished_grid
    for command in ("compare", "report"):
        assert main([command, "finishd", "--tracking-uri", uri]) == 2
        assert f"no grid named 'finishd' in {uri}; grids there: {name}" in capsys.readouterr().err


def test_unknown_metric_lists_the_metrics_that_exist(finished_grid, capsys):
    uri, name = finished_grid
    assert main(["compare", name, "--tracking-uri", uri, "--sort", "final/acuracy"]) == 2
    err = capsys.readouterr().err
    assert "--sort final/acuracy: not a final metric of 'finished'" in err
    assert 'did you mean "final/avg_acc"' in err
    assert all(f"final/{metric}" in err for metric in HEADLINE)


def test_compare_filters_and_sorts_best_first(finished_grid, capsys):
    uri, name = finished_grid
    # Best first among the unflagged groups, then the flagged ones (best first among them).
    by_forgetting = compare_table(uri, name, sort="final/forgetting")
    flagged = list(by_forgetting["flagged"] > 0)
    assert flagged == sorted(flagged)
    for group in (by_forgetting[by_forgetting["flagged"] == 0],
                  by_forgetting[by_forgetting["flagged"] > 0]):  # fmt: skip
        assert list(group["forgetting_mean"]) == sorted(group["forgetting_mean"])
    by_accuracy = compare_table(uri, name, sort="final/avg_acc")
    for group in (by_accuracy[by_accuracy["flagged"] == 0],
                  by_accuracy[by_accuracy["flagged"] > 0]):  # fmt: skip
        assert list(group["avg_acc_mean"]) == sorted(group["avg_acc_mean"], reverse=True)
    only = compare_table(
        uri, name, strategies=["rehearsal"], where={"strategy.buffer.size": "50.0"}
    )
    assert list(only["strategy"]) == ["rehearsal"]
    assert main(["compare", name, "--tracking-uri", uri, "--strategy", "naive",
                 "--where", "train.lr=0.050"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "naive" in out and "rehearsal" not in out
    assert main(["compare", name, "--tracking-uri", uri, "--strategy", "ewc"]) == 2
    assert "--strategy ewc: no finished cell has it; this grid has naive, rehearsal" in (
        capsys.readouterr().err
    )
    assert main(["compare", name, "--tracking-uri", uri, "--where", "train.l=0.05"]) == 2
    assert "did you mean train.lr" in capsys.readouterr().err


def test_compare_filters_beyond_equality_and_suggests_names(finished_grid, capsys):
    uri, name = finished_grid
    sizes = {"strategy.buffer.size": "50"}  # only rehearsal declares it
    assert list(compare_table(uri, name, where=[("strategy.buffer.size", ">=", "50")])
                ["strategy"]) == ["rehearsal"]  # fmt: skip
    assert compare_table(uri, name, where=sizes).shape[0] == 1
    either = compare_table(uri, name, where=[("train.lr", "=", "0.05,0.1")])
    assert sorted(either["strategy"]) == ["naive", "rehearsal"]
    assert main(["compare", name, "--tracking-uri", uri, "--where", "train.lr<0.05"]) == 2
    assert "--where train.lr<0.05: no cell has it; values here: 0.05" in capsys.readouterr().err
    assert main(["compare", name, "--tracking-uri", uri, "--where", "train.lr!=0.05"]) == 2
    assert main(["compare", name, "--tracking-uri", uri, "--where", "train.lr<=0.05"]) == 0
    capsys.readouterr()
    assert main(["compare", name, "--tracking-uri", uri, "--where", "train.lr~0.05"]) == 2
    assert "expected PARAM=VALUE" in capsys.readouterr().err
    assert main(["compare", name, "--tracking-uri", uri, "--strategy", "rehersal"]) == 2
    assert 'did you mean "rehearsal"' in capsys.readouterr().err
    assert main(["compare", name, "--tracking-uri", uri, "--sort", "acc/exp_0"]) == 2
    err = capsys.readouterr().err
    assert "are curves, not final values" in err and "these can sort: final/avg_acc" in err
    assert main(["compare", name, "--tracking-uri", uri, "--sort", "final/forgeting"]) == 2
    assert 'did you mean "final/forgetting"' in capsys.readouterr().err


def test_parent_run_describes_the_grid_and_links_every_cell(finished_grid):
    uri, name = finished_grid
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'grid'")
    note = parent.data.tags["mlflow.note.content"]
    cells = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    for run in cells:
        assert f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" in note
    assert "| rehearsal" in note and "± " in note


def test_readme_search_runs_query_ranks_strategies_by_forgetting(finished_grid, monkeypatch):
    uri, name = finished_grid
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runs = mlflow.search_runs(
        experiment_names=[name],
        filter_string="tags.forgetless.role = 'group'",
        order_by=["metrics.`final/forgetting_mean` ASC"],
    )
    means = [f"metrics.final/{m}_mean" for m in ("forgetting", "avg_acc", "memory_bytes")]
    ranked = runs[["tags.forgetless.strategy", *means]]
    assert set(ranked["tags.forgetless.strategy"]) == {"naive", "rehearsal"}
    assert ranked["metrics.final/forgetting_mean"].is_monotonic_increasing


@pytest.fixture(scope="module")
def diverged_grid(make_grid, tmp_path_factory) -> tuple[str, str, str]:
    """(tracking URI, grid name, diverged variant): naive at lr 0.05 and at lr 1e8 x 2 seeds,
    run for real. At 1e8 the cells FINISH near chance accuracy, and so "forget" less than
    the healthy ones; the test tags them `forgetless.flag` by hand, as the runner would."""
    from forgetless.experiments.runner import run_grid

    uri = f"sqlite:///{tmp_path_factory.mktemp('diverged-grid') / 'mlflow.db'}"
    grid = make_grid(name="diverged", seeds=[0, 1], grid={"train.lr": [0.05, 1e8]})
    assert {o.status for o in run_grid(grid, uri)} == {"FINISHED"}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid.name)
    for run in client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'"):
        if "forgetless.flag" in run.data.tags:  # this test decides which cells are flagged
            client.delete_tag(run.info.run_id, "forgetless.flag")
        if float(run.data.params["train.lr"]) > 1:
            accuracy = run.data.metrics["final/avg_acc"]
            reason = f"final avg_acc {accuracy:.3f} near chance 0.100"
            client.set_tag(run.info.run_id, "forgetless.flag", reason)
    (diverged,) = {c.variant for c in grid.cells if c.config["train"]["lr"] > 1}
    return uri, grid.name, diverged


def test_compare_ranks_a_flagged_group_last_whatever_the_sort(diverged_grid, capsys):
    uri, name, diverged = diverged_grid
    by_forgetting = compare_table(uri, name, sort="final/forgetting")
    healthy, flagged = by_forgetting.iloc[0], by_forgetting.iloc[1]
    assert (flagged.variant, flagged.flagged, healthy.flagged) == (diverged, 2, 0)
    # The diverged group forgets least, which is why it must not be ranked by it.
    assert flagged.forgetting_mean < healthy.forgetting_mean
    assert flagged.flag.startswith("seed 0: final avg_acc ") and "; seed 1: " in flagged.flag
    for metric in ["avg_acc", "learning_acc", "forgetting", "bwt", "fwt", "train_time_s",
                   "memory_bytes"]:  # fmt: skip
        for suffix in ("", "_std"):
            table = compare_table(uri, name, sort=f"final/{metric}{suffix}")
            assert list(table["variant"])[-1] == diverged, metric + suffix

    assert main(["compare", name, "--tracking-uri", uri, "--sort", "final/forgetting"]) == 0
    out = capsys.readouterr().out
    rows = out.split("\n\n")[0].splitlines()
    assert "FLAGGED (2 of 2 seeds)" in rows[-1] and diverged in rows[-1]
    assert "FLAGGED" not in rows[-2]
    listed = out.split("FLAGGED, ranked last", 1)[1]
    assert f"naive [{diverged}]: seed 0: final avg_acc" in listed


def test_report_never_names_a_flagged_group_best_and_lists_its_cells(diverged_grid, tmp_path):
    uri, name, diverged = diverged_grid
    built = report.build(uri, name)
    sections = {s.key: s for s in built.sections}
    assert list(sections)[:4] == ["glance", "flagged", "table", "statistics"]
    label = f"naive [{diverged}]"

    headline = sections["glance"].text.split("\n\n")[0]
    ranked, not_ranked = headline.split("Flagged, so not ranked")
    # Both groups are naive, the lower bound: the healthy one is shown as the reference, the
    # flagged one only among the flagged.
    assert label not in ranked and "naive [train.lr=0.05] (lower bound)" in ranked
    assert label in not_ranked
    glance = sections["glance"].table
    assert glance["flag"].iloc[-1] == "FLAGGED (2 of 2 seeds)"
    assert (glance["flag"].iloc[:-1] == "").all()

    listed = sections["flagged"].table
    assert list(listed["strategy"]) == [label, label] and list(listed["seed"]) == ["0", "1"]
    assert all(reason.startswith("final avg_acc ") for reason in listed["reason"])

    final = sections["table"]
    flagged_rows = final.table.index[final.table["flag"] != ""]
    assert not final.bold.loc[flagged_rows].any().any()  # never bold, though it forgets least

    stats = sections["statistics"].table
    assert not stats["vs"].str.contains(diverged, regex=False).any()
    assert (stats.loc[stats["strategy"] == f"{label} (FLAGGED)", "vs"] != "(best)").all()

    out = tmp_path / "report.html"
    assert main(["report", name, "--tracking-uri", uri, "--out", str(out)]) == 0
    page = Page()
    page.feed(out.read_text())
    assert len(page.sections["flagged"]["tr"]) == 2


def create_cell_run(client: MlflowClient, experiment_id: str, name: str, strategy: str, seed: int):
    """A cell run of stream `digits` with the contract's tags, through MLflow's API."""
    return client.create_run(experiment_id, tags={
        "forgetless.role": "cell", "forgetless.stream": "digits",
        "forgetless.strategy": strategy, "forgetless.seed": str(seed),
        "forgetless.variant": "-", "forgetless.grid": name,
    })  # fmt: skip


def log_cells(uri: str, name: str, artifacts: Path, finals: dict[str, list[dict]]) -> None:
    """Cell runs logged with MLflow's API: per strategy, one dict of final metrics per seed."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
    for strategy, seeds in finals.items():
        for seed, final in enumerate(seeds):
            run = create_cell_run(client, experiment_id, name, strategy, seed)
            metrics = [Metric(f"final/{k}", v, 0, 0) for k, v in final.items()]
            client.log_batch(run.info.run_id, metrics=metrics)
            R = [[final["avg_acc"], 0.0], [final["avg_acc"], final["avg_acc"]]]
            matrix = {"experiences": ["e0", "e1"], "R": R, "baseline": [0, 0]}
            client.log_dict(run.info.run_id, matrix, "accuracy_matrix.json")
            client.set_terminated(run.info.run_id, "FINISHED")


def test_unknown_memory_shows_as_na_never_as_zero(tracking_uri, tmp_path, capsys):
    def final(memory: float, forgetting: float) -> dict:
        return {"avg_acc": 0.6, "learning_acc": 0.8, "forgetting": forgetting, "bwt": -0.1,
                "fwt": 0.0, "train_time_s": 1.0, "memory_bytes": memory}  # fmt: skip

    nan = float("nan")
    log_cells(tracking_uri, "unknown-memory", tmp_path, {
        "naive": [final(0, 0.4), final(0, 0.4)],
        "avalanche.MER": [final(nan, 0.1), final(nan, 0.1)],  # forgets least, memory unknown
        "half-known": [final(nan, 0.3), final(5000, 0.3)],  # unknown for one seed: unknown
    })  # fmt: skip
    table = compare_table(tracking_uri, "unknown-memory", sort="final/memory_bytes")
    assert table["strategy"][0] == "naive"  # unknown memory is never ranked the smallest
    assert set(table["strategy"][1:]) == {"avalanche.MER", "half-known"}
    assert list(table["memory_bytes_mean"][1:].isna()) == [True, True]
    assert main(["compare", "unknown-memory", "--tracking-uri", tracking_uri]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert re.search(r"\b0 ± 0\b", rows["naive"])
    for strategy in ("avalanche.MER", "half-known"):
        assert "n/a" in rows[strategy] and "nan" not in rows[strategy]

    built = report.build(tracking_uri, "unknown-memory")
    sections = {s.key: s for s in built.sections}
    headline = sections["glance"].text.split("\n\n")[0]
    assert headline.startswith("digits: of the methods, avalanche.MER forgets least (0.100), "
                               "at an unknown "
                               "amount (n/a) of memory")  # fmt: skip
    memory = sections["table"].table.set_index("strategy")["memory"]
    assert (memory["avalanche.MER"], memory["half-known"], memory["naive"]) == (
        "n/a",
        "n/a",
        "0 ± 0 B",
    )
    assert sections["memory"].images  # drawn for the strategies whose memory is known


def test_setup_section_states_the_grid_file_settings_experiences_commit_and_versions(
    finished_grid,
):
    from importlib import metadata

    from forgetless.streams.digits import read_digits

    uri, name = finished_grid
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'grid'")
    grid_file = Path(client.download_artifacts(parent.info.run_id, "grid.yaml")).read_text()
    setup = {s.key: s for s in report.build(uri, name).sections}["setup"]

    assert setup.code == grid_file and "name: finished" in setup.code
    cells = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'cell'")
    (commit,) = {run.data.tags["mlflow.source.git.commit"] for run in cells}
    assert f"{commit} (4 of 4 cells)" in setup.text
    tables = dict(setup.tables)
    common = tables["Settings of every cell"].set_index("setting")["value"]
    assert (common["train.lr"], common["model.hidden"], common["stream.n_experiences"]) == (
        "0.05", "[32]", "2")  # fmt: skip
    strategies = tables["Each strategy's settings beyond those"].set_index("strategy")
    assert "strategy.buffer.size=50" in strategies.at["rehearsal", "settings"]
    # The class order is fixed (0..9, 2 experiences of 5 classes); a test set holds a
    # quarter (rounded down) of each class's images.
    labels = read_digits()[1]
    test_sizes = [sum(int((labels == c).sum()) // 4 for c in range(a, a + 5)) for a in (0, 5)]
    experiences = next(t for caption, t in setup.tables if caption.startswith("Each seed's"))
    assert list(experiences["seed"]) == ["0", "1"]
    for row in experiences.itertuples():
        assert (row[3], row[4]) == (f"0,1,2,3,4 ({test_sizes[0]} test)",
                                    f"5,6,7,8,9 ({test_sizes[1]} test)")  # fmt: skip
    versions = tables["Package versions"].set_index("package")["version"]
    assert versions["torch"] == metadata.version("torch")
    assert versions["mlflow"] == metadata.version("mlflow")


def test_latex_table_has_booktabs_rules_and_the_numbers_of_mlflow(finished_grid, tmp_path):
    uri, name = finished_grid
    out = tmp_path / "paper.md"
    assert main(["report", name, "--tracking-uri", uri, "--out", str(out)]) == 0
    latex = (tmp_path / "paper.tex").read_text()
    assert latex.index(r"\toprule") < latex.index(r"\midrule") < latex.index(r"\bottomrule")
    body = latex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0]
    rows = [[c.strip() for c in line.rstrip("\\ ").split("&")]
            for line in body.strip().splitlines()]  # fmt: skip
    header = latex.split(r"\toprule", 1)[1].split(r"\midrule", 1)[0].strip().rstrip("\\ ")
    columns = [c.strip() for c in header.split("&")]
    assert columns[:3] == ["stream", "strategy", r"avg\_acc"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    groups = client.search_runs([experiment.experiment_id], "tags.`forgetless.role` = 'group'")
    by_strategy = {row[1]: dict(zip(columns, row)) for row in rows}
    assert set(by_strategy) == {"naive", "rehearsal"}
    for run in groups:
        row = by_strategy[run.data.tags["forgetless.strategy"]]
        for metric in ("avg_acc", "forgetting"):
            mean = run.data.metrics[f"final/{metric}_mean"]
            std = run.data.metrics[f"final/{metric}_std"]
            cell = row[metric.replace("_", r"\_")].removeprefix(r"\bfseries ")
            assert cell == rf"{mean:.3f} $\pm$ {std:.3f}"


def log_seed_matrices(uri: str, name: str, artifacts: Path, matrices: dict[str, list]) -> None:
    """Cells of stream `digits` whose accuracy matrices and finals are given, one per seed,
    with the manifest a split stream writes (classes in a fixed order)."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name, artifact_location=artifacts.as_uri())
    manifest = {"experiences": [{"index": 0, "name": "classes_3_7", "train": 9, "test": 4,
                                 "classes": [3, 7]},
                                {"index": 1, "name": "classes_1_2", "train": 9, "test": 5,
                                 "classes": [1, 2]}]}  # fmt: skip
    for strategy, seeds in matrices.items():
        for seed, R in enumerate(seeds):
            run = create_cell_run(client, experiment_id, name, strategy, seed)
            R = np.asarray(R)
            final = {"avg_acc": R[-1].mean(), "learning_acc": np.diag(R).mean(),
                     "forgetting": R[0, 0] - R[1, 0], "bwt": R[1, 0] - R[0, 0], "fwt": 0.0,
                     "train_time_s": 1.0 + seed, "memory_bytes": 51200.0 * (seed + 1)}  # fmt: skip
            steps = [Metric("avg_acc", float(R[i, : i + 1].mean()), 0, i) for i in range(2)]
            finals = [Metric(f"final/{k}", float(v), 0, 0) for k, v in final.items()]
            client.log_batch(run.info.run_id, metrics=steps + finals)
            client.log_dict(run.info.run_id, {"experiences": ["classes_3_7", "classes_1_2"],
                                              "R": R.tolist(), "baseline": [0, 0]},
                            "accuracy_matrix.json")  # fmt: skip
            client.log_dict(run.info.run_id, manifest, "stream_manifest.json")
            client.set_terminated(run.info.run_id, "FINISHED")


SEED_MATRICES = {
    "naive": [[[0.9, 0.0], [0.1, 0.8]], [[0.8, 0.0], [0.3, 0.9]], [[1.0, 0.0], [0.2, 0.7]]],
    "rehearsal": [[[0.9, 0.0], [0.6, 0.8]], [[0.9, 0.0], [0.7, 0.8]], [[0.9, 0.0], [0.8, 0.8]]],
}


@pytest.fixture
def seed_grid(tracking_uri, tmp_path, request) -> tuple[str, str, report.Recorded, pd.DataFrame]:
    name = f"seed-matrices-{request.node.name[-20:]}"
    log_seed_matrices(tracking_uri, name, tmp_path, SEED_MATRICES)
    cells = cell_frame(tracking_uri, name).assign(label=lambda c: c["strategy"])
    return tracking_uri, name, report.read_recorded(tracking_uri, name, cells), cells


def test_std_heatmap_is_the_sample_std_of_the_seeds_matrices(seed_grid):
    uri, name, recorded, cells = seed_grid
    fig = report.heatmaps_figure("digits", cells, ["naive", "rehearsal"], recorded)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    # naive R[1][0] over seeds: 0.1, 0.3, 0.2 -> mean 0.2, sample std 0.1 (ddof=1).
    std = panels["naive: std"].images[0].get_array()
    assert std[1, 0] == pytest.approx(0.1)
    assert np.allclose(std, np.std(SEED_MATRICES["naive"], axis=0, ddof=1))
    assert np.allclose(panels["rehearsal: std"].images[0].get_array(),
                       [[0.0, 0.0], [0.1, 0.0]])  # fmt: skip
    assert np.allclose(panels["naive: mean"].images[0].get_array(), [[0.9, 0.0], [0.2, 0.8]])
    # Every seed saw the classes in one order: the axes name them, numbered from 0.
    ticks = [t.get_text() for t in panels["naive: mean"].get_xticklabels()]
    assert ticks == ["0: 3,7", "1: 1,2"]


def test_experiences_are_numbered_as_the_mlflow_steps_in_curves_and_heatmaps(seed_grid):
    uri, name, recorded, cells = seed_grid
    styles = report.plots.styles(["naive", "rehearsal"])
    fig = report.average_accuracy_figure("digits", cells, ["naive", "rehearsal"],
                                         recorded.matrices, styles)  # fmt: skip
    (ax,) = fig.axes
    client = MlflowClient(uri)
    run_id = cells.loc[(cells["strategy"] == "naive") & (cells["seed"] == 0), "run_id"].item()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "avg_acc"))
    mean_line = next(line for line in ax.get_lines() if line.get_label() == "naive")
    assert list(mean_line.get_xdata()) == [step for step, _ in history] == [0, 1]
    assert ax.get_xlabel() == "experience (MLflow step)"
    # The mean line over seeds; each seed's own values are drawn beside it.
    per_seed = [[np.mean(R[0][:1]), np.mean(R[1])] for R in SEED_MATRICES["naive"]]
    assert np.allclose(mean_line.get_ydata(), np.mean(per_seed, axis=0))
    seed_points = [c.get_offsets()[:, 1] for c in ax.collections if c.get_offsets().size]
    assert any(np.allclose(points, [v for _, v in history]) for points in seed_points)


def test_plots_show_every_seed_and_tell_overlapping_strategies_apart(seed_grid):
    uri, name, recorded, cells = seed_grid
    labels = ["naive", "rehearsal", "ewc", "lwf", "si", "gem", "agem"]
    styles = report.plots.styles(labels)
    assert len({(s.marker, str(s.linestyle)) for s in styles.values()}) == len(labels)
    points = report.seed_points(cells, ["naive", "rehearsal"], "learning_acc", "forgetting")
    fig = report.plots.trade_off(points, styles, "x", "y", "t", better="lower right")
    (ax,) = fig.axes
    hollow = [c.get_offsets() for c in ax.collections if len(c.get_offsets()) == 3]
    learning = [np.diag(R).mean() for R in np.asarray(SEED_MATRICES["rehearsal"])]
    forgetting = [R[0][0] - R[1][0] for R in SEED_MATRICES["rehearsal"]]
    assert any(np.allclose(h, np.column_stack([learning, forgetting])) for h in hollow)
    markers = {line.get_marker() for line in ax.get_lines() if line.get_marker() != "None"}
    assert markers >= {styles["naive"].marker, styles["rehearsal"].marker}


def test_memory_reads_in_kb_and_mb_in_text_tables_and_axes(seed_grid):
    uri, name, recorded, cells = seed_grid
    assert report.plots.memory_text(0) == "0 B"
    assert report.plots.memory_text(51200) == "50.0 KB"
    assert report.plots.memory_text(3 * 1024**2, 0.5 * 1024**2) == "3.0 ± 0.5 MB"
    assert report.plots.memory_text(float("nan")) == "n/a"
    built = report.build(uri, name)
    sections = {s.key: s for s in built.sections}
    # Seeds hold 50, 100 and 150 KB: mean 100 KB, sample std 50 KB.
    memory = sections["table"].table.set_index("strategy")["memory"]
    assert memory["naive"] == "100 ± 50 KB"
    assert "at 100 KB of memory" in sections["glance"].text
    points = report.seed_points(cells, ["naive"], "memory_bytes", "avg_acc")
    fig = report.plots.trade_off(points, report.plots.styles(["naive"]), "m", "a", "t",
                                 better="upper left", memory_axis=True)  # fmt: skip
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[:5] == ["0", "1 KB", "10 KB", "100 KB", "1 MB"]  # seeds hold up to 150 KB
