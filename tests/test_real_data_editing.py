"""ZsRE and CounterFact end to end, on the real samples in ../shared/data: `forgetless
validate` accepts their grids, the runner builds each stream from a grid and scores it as
EasyEdit does (the target after a space, generalization on the rephrase, locality on the
records' own pairs against the pre-edit predictions), and the editors and Larimar run
their cells."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from shared_data import SHARED_DATA

from forgetless.core.schema import ConfigError
from forgetless.experiments.cli import main as cli
from forgetless.experiments.config import grid_from_dict
from forgetless.experiments.evaluate import score_edits
from forgetless.experiments.runner import build_cell, run_grid
from forgetless.models.causal_lm import IGNORE

ZSRE = SHARED_DATA / "zsre" / "zsre_mend_train.sample.json"
COUNTERFACT = SHARED_DATA / "counterfact" / "counterfact-edit.sample.json"
MODEL = {"name": "llama_tiny", "layers": 3, "hidden": 32, "heads": 2, "intermediate": 64,
         "context": 256}  # fmt: skip
LARIMAR = {"name": "larimar", "slots": 8, "steps": 2, "key_steps": 2, "batch_size": 4,
           "answer_tokens": 48}  # fmt: skip


pytestmark = pytest.mark.usefixtures("offline", "shared_cache", "one_thread")


def stream(kind: str, **params) -> dict:
    path = ZSRE if kind == "zsre" else COUNTERFACT
    return {"name": kind, "path": str(path), "edits": 3, **params}


def grid(streams: list[dict], strategies: list, folder: Path, name: str = "real-data"):
    return grid_from_dict({
        "name": name, "streams": streams, "strategies": strategies, "model": MODEL,
        "storage": str(folder / "runs"),
    })  # fmt: skip


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.mark.parametrize("kind", ["zsre", "counterfact"])
def test_forgetless_validate_accepts_a_grid_on_the_shared_file(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(yaml.safe_dump({
        "name": kind, "streams": [stream(kind)], "model": MODEL,
        "strategies": ["ft_l", "grace", "wise", {**LARIMAR, "corpus": str(ZSRE)}],
    }))  # fmt: skip
    assert cli(["validate", str(path)]) == 0
    assert "valid, 4 cells" in capsys.readouterr().out


def test_the_zsre_stream_edits_its_records_scored_on_rephrase_and_loc_as_easyedit(tmp_path):
    spec = stream("zsre", start=2, loc_prompts=2)
    built, strategy = build_cell(grid([spec], ["ft_l"], tmp_path).cells[0], "cpu")
    raw = records(ZSRE)
    requests = [r for e in built for r in e.train]
    assert [(r.prompt, r.target, r.paraphrases) for r in requests] == [
        (r["src"], " " + r["alt"], (r["rephrase"],)) for r in raw[2:5]
    ]
    spare = {f"{r['loc']} {r['loc_ans']}" for i, r in enumerate(raw) if not 2 <= i < 5}
    for r in requests:  # WISE's x_i: other records' NQ pairs, never a scored one
        assert len(r.loc_prompts) == 2 and set(r.loc_prompts) <= spare
    # Locality: the edited records' own loc + " " + loc_ans, labelled with the pre-edit
    # model's prediction at each answer token (EasyEdit's), so the unedited model scores 1.
    model, general = strategy.model, built.general
    tokens = model.tokenizer
    for row, record in enumerate(raw[2:5]):
        prompt = tokens(record["loc"], add_special_tokens=False).input_ids
        answer = tokens(" " + record["loc_ans"], add_special_tokens=False).input_ids
        assert general.x[row, : len(prompt) + len(answer)].tolist() == prompt + answer
        labelled = (general.y[row] != IGNORE).nonzero().flatten().tolist()
        assert labelled == list(range(len(prompt), len(prompt) + len(answer)))
        with torch.no_grad():
            logits = model(general.x[row : row + 1, : len(prompt) + len(answer)])
        predicted = logits[0, len(prompt) - 1 : -1].argmax(-1)
        assert torch.equal(general.y[row, labelled], predicted)
    _, scores = score_edits(strategy, built)
    assert scores["locality"] == 1.0 and scores["locality_token_acc"] == 1.0
    generalization = built.experiences[0].test.generalization
    first = tokens(raw[2]["rephrase"], add_special_tokens=False).input_ids
    assert generalization.x[0, : len(first)].tolist() == first


def test_the_counterfact_stream_scores_locality_on_each_record_s_neighborhood(tmp_path):
    built, _ = build_cell(grid([stream("counterfact")], ["ft_l"], tmp_path).cells[0], "cpu")
    raw = records(COUNTERFACT)
    requests = [r for e in built for r in e.train]
    assert [(r.prompt, r.target, r.original) for r in requests] == [
        (r["prompt"], " " + r["target_new"], r["ground_truth"]) for r in raw[:3]
    ]
    assert [r.paraphrases for r in requests] == [(r["rephrase_prompt"],) for r in raw[:3]]
    assert len(built.general) == 3  # one neighborhood prompt per flat record


def test_rome_s_nested_counterfact_keeps_every_neighborhood_prompt_of_the_edited_records(
    tmp_path,
):
    def record(i: int) -> dict:
        return {
            "case_id": i, "paraphrase_prompts": [f"S{i} talks"],
            "neighborhood_prompts": [f"N{i}a speaks", f"N{i}b speaks"],
            "requested_rewrite": {"prompt": "{} speaks", "subject": f"S{i}",
                                  "target_new": {"str": "English"},
                                  "target_true": {"str": "Tamil"}},
        }  # fmt: skip

    path = tmp_path / "rome.json"
    path.write_text(json.dumps([record(i) for i in range(4)]))
    spec = {"name": "counterfact", "path": str(path), "edits": 2}
    built, _ = build_cell(grid([spec], ["ft_l"], tmp_path).cells[0], "cpu")
    assert len(built.general) == 4  # 2 records x 2 neighbours, not the first 2 of all
    assert all(r.loc_prompts[0].startswith(("N2", "N3")) for e in built for r in e.train)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"start": 58}, "streams[0].edits: records 58 to 60 are asked for (start + edits)"),
        ({"start": -1}, "streams[0].start: must be >= 0"),
        ({"loc_prompts": 58}, "57 locality pairs outside the edited records"),
    ],
)
def test_a_file_stream_refuses_records_it_does_not_have(params, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_cell(grid([stream("zsre", **params)], ["ft_l"], tmp_path).cells[0], "cpu")


def test_editors_and_larimar_finish_zsre_and_counterfact_cells(tracking_uri, tmp_path):
    strategies = [{"name": "ft_l", "layer": 1, "steps": 2},
                  {"name": "wise", "layer": 1, "steps": 2, "prefixes": 1},
                  {**LARIMAR, "corpus": str(ZSRE)}]  # fmt: skip
    g = grid([stream("zsre", edits=2), stream("counterfact", edits=2)], strategies, tmp_path)
    outcomes = run_grid(g, tracking_uri)
    assert [o.status for o in outcomes] == ["FINISHED"] * 6, [o.error for o in outcomes]
    for outcome in outcomes:
        assert 0 <= outcome.summary["locality"] <= 1 and "edit_latency_s" in outcome.summary


def test_larimar_without_a_corpus_on_zsre_says_why_and_what_to_give(tmp_path):
    with pytest.raises(ConfigError) as error:
        build_cell(grid([stream("zsre")], [LARIMAR], tmp_path).cells[0], "cpu")
    message = str(error.value)
    assert "no base fact corpus" in message and "strategy.corpus" in message


def test_larimar_trains_on_the_corpus_records_the_stream_does_not_edit(tmp_path):
    _, larimar = build_cell(
        grid([stream("zsre")], [{**LARIMAR, "corpus": str(ZSRE)}], tmp_path).cells[0], "cpu"
    )
    from forgetless.strategies.larimar import fact_corpus

    built = build_cell(grid([stream("zsre")], ["ft_l"], tmp_path).cells[0], "cpu")[0]
    facts = fact_corpus(built, str(ZSRE), larimar.model, 48)
    edited = {r["src"] for r in records(ZSRE)[:3]} | {r["rephrase"] for r in records(ZSRE)[:3]}
    assert facts and not {f.prompt for f in facts} & edited
