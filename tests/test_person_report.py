"""The person-split protocol: folds by person, the identity metric, the probes, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facedist.reports.person import (MODEL_INPUTS, PersonReportConfig, identity_matches, logistic_probe, person_folds,
                                     unit_total_variance, write_person_report)


def test_person_folds_keep_each_person_in_one_fold():
    subjects = np.repeat([f"p{i}" for i in range(23)], 3)
    for seed in range(3):
        folds = person_folds(subjects, 5, seed)
        assert set(folds) == set(range(5))
        for person in set(subjects):
            assert len(set(folds[subjects == person])) == 1
    assert (person_folds(subjects, 5, 0) != person_folds(subjects, 5, 1)).any()  # seeds reshuffle


def test_identity_metric_discounts_what_varies_within_a_person():
    """Each person's two images differ along a few shared large directions (an expression): plain
    cosine matching fails, the whitening learned on other people matches new ones."""
    rng = np.random.default_rng(0)
    people, dims = 60, 20
    identity = rng.normal(size=(people, dims))
    nuisance = rng.normal(size=(3, dims)) * 4
    x = np.concatenate([identity + rng.normal(size=(people, 3)) @ nuisance,
                        identity + rng.normal(size=(people, 3)) @ nuisance]) + rng.normal(0, 0.1, (2 * people, dims))
    subjects = np.concatenate([np.arange(people), np.arange(people)]).astype(str)
    train = np.flatnonzero(np.arange(2 * people) % people < 40)  # people 0..39 teach the metric
    gallery = np.arange(people)                                   # first image of everyone
    probes = np.arange(people + 40, 2 * people)                   # second image of people 40..59
    learned = identity_matches(x, subjects, train, gallery, probes).mean()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    plain = (subjects[gallery][(unit[probes] @ unit[gallery].T).argmax(1)] == subjects[probes]).mean()
    assert learned > 0.9 and learned > plain + 0.3


def test_logistic_probe_learns_a_linear_rule():
    rng = np.random.default_rng(1)
    # wider than there are training rows: 300 values driven by 5 latent factors + noise
    z = rng.normal(size=(300, 5))
    x = z @ rng.normal(size=(5, 300)) + 0.3 * rng.normal(size=(300, 300))
    y = (z[:, 0] + 0.5 * z[:, 1] > 0).astype(int)
    x = unit_total_variance(x, np.arange(200))
    pred = logistic_probe(x[:200], y[:200], x[200:], 2)
    assert (pred == y[200:]).mean() > 0.85


@pytest.mark.slow  # extracts 24 photos, trains per fold and seed
def test_person_report_on_real_faces(yale_dir, tmp_path):
    """Yale, 6 people x 4 photos, default extraction: the report's files, every descriptor row."""
    from facedist.extraction.config import ExtractConfig
    from facedist.extraction.local import run_extraction
    from facedist.extraction.rows import discover_records
    from facedist.training.data import encode_labels, load_data

    names = [f"subject{i:02d}.{c}" for i in range(1, 7) for c in ("normal", "happy", "sad", "glasses")]
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((yale_dir / name).read_bytes())
    table = str(tmp_path / "coefficients")
    run_extraction(discover_records(str(folder)), table, ExtractConfig(), progress=None)
    out = tmp_path / "report"
    results = write_person_report(PersonReportConfig(data=table, out=str(out), folds=3, seeds=2, gallery="normal",
                                                     include_images=False, heads=("linear",)), log=lambda *_: None)
    assert results["people"] == 6 and results["rows_used"] >= 22
    # the probes on every descriptor the default table has, and a trained linear head on each candidate input
    models = lambda task: {f"linear:{'+'.join(i)}" for i in MODEL_INPUTS[task]}  # noqa: E731
    assert set(results["summary"]["identity"]) == {"id", "tex", "id+tex", "feature", "emb", "pixels",
                                                   *models("identity")}
    assert set(results["summary"]["expression"]) == {"exp", "tex", "exp+tex", "feature", "exp+feature", "expf",
                                                     "pixels", *models("expression")}
    for rows in results["summary"].values():
        for row in rows.values():
            assert 0.0 <= row["mean"] <= 1.0 and len(row["seeds"]) == 2
    assert json.loads((out / "results.json").read_text())["protocol"] == "person"
    text = (out / "table_person.md").read_text()
    assert "| identity: trained model, inputs | linear head |" in text and "| α + τ | " in text
    assert "(shipped)" in text and results["shipped"]["identity"] in results["summary"]["identity"] and (out / "person_protocol.png").stat().st_size > 0
    # the most-missed rows are the best descriptor's errors, no more and no fewer
    data = load_data(table)
    table_paths = {str(p) for p in data.path}
    assert results["rows_used"] == len(data)
    # identity: every image but the 6 galleries; expression: the rows with an expression label
    scored_rows = {"identity": len(data) - 6, "expression": int((encode_labels(data.expression)[0] >= 0).sum())}
    for task, entry in results["most_missed"].items():
        row = results["summary"][task][entry["descriptor"]]
        assert row["mean"] == max(r["mean"] for r in results["summary"][task].values())
        assert all(1 <= r["missed"] <= r["scored"] == 2 and r["path"] in table_paths for r in entry["rows"])
        errors = sum(round((1 - a) * scored_rows[task]) for a in row["seeds"])
        assert sum(r["missed"] for r in entry["rows"]) == errors
        assert all(set(r["also_missed_by"]) <= set(entry["probes"]) - {entry["descriptor"]} for r in entry["rows"])
        assert 0 <= entry["missed_by_every_probe"] <= sum(2 * r["missed"] > r["scored"] for r in entry["rows"])
    assert (out / "most_missed.png").stat().st_size > 0


def test_markdown_marks_a_row_run_on_fewer_seeds():
    from facedist.reports.person import _markdown

    results = {"folds": 5, "seeds": 2, "rows_used": 4, "people": 2, "backend": "fit", "gallery": "neutral",
               "summary": {"gender": {"tex": {"mean": 0.9, "std": 0.01, "seeds": [0.89, 0.91]},
                                      "resnet34_images": {"mean": 0.8, "std": 0.0, "seeds": [0.8]}}}}
    lines = _markdown(results).splitlines()
    assert any("τ" in line and "0.900 ± 0.010" in line for line in lines)
    assert any("ResNet-34" in line and "0.800 (1 seed)" in line for line in lines)


def test_most_missed_counts_misses_per_row_across_seeds():
    """Rows ordered by how many seeds missed them; a seed that could not score the best
    descriptor (too few classes in a fold) adds neither hits nor misses."""
    from types import SimpleNamespace

    from facedist.reports.person import SeedResult, most_missed

    data = SimpleNamespace(path=np.array(["a.jpg", "b.jpg", "c.jpg", "d.jpg"]),
                           subject=np.array(["p1", "p1", "p2", "p2"]),
                           expression=np.array(["neutral", "happy", "neutral", "happy"]))
    nan = np.nan
    seeds = [SeedResult({}, {"expression": {"exp": np.array([1.0, 0, 0, 1]), "tex": np.array([0.0, 0, 0, 0])}}),
             SeedResult({}, {"expression": {"exp": np.array([1.0, 0, 1, nan])}}),
             SeedResult({}, {"expression": {}})]
    summary = {"expression": {"exp": {"mean": 0.6}, "tex": {"mean": 0.0}}}
    out = most_missed(data, summary, seeds)["expression"]
    assert out["descriptor"] == "exp"
    assert [(r["path"], r["missed"], r["scored"], r["label"]) for r in out["rows"]] == [
        ("b.jpg", 2, 2, "happy"), ("c.jpg", 1, 2, "neutral")]
    # tex misses every row on the one seed that scored it; exp usually misses only b (c: 1 of 2)
    assert [r["also_missed_by"] for r in out["rows"]] == [["tex"], ["tex"]]
    assert out["probes"] == ["exp", "tex"] and out["missed_by_every_probe"] == 1
