"""`facedist run` on the embedded default: local Ray extraction, Ray Train, report - end to end on
a few real people, with small epoch counts."""

import json

import pytest

from facedist import runtime, storage
from facedist.cli import main
from facedist.workflow import WorkflowConfig, run_workflow


@pytest.fixture(scope="module")
def few_people(tmp_path_factory, yale_dir):
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(yale_dir.iterdir()):
        if path.name.split(".")[0] in ("subject01", "subject03", "subject08", "subject10"):
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return folder


@pytest.mark.ray
def test_run_extracts_trains_and_reports(few_people, tmp_path, monkeypatch, capfd):
    # A relative --out, as in the README: Ray workers run elsewhere and must still find it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    out = tmp_path / "out"
    try:
        result = run_workflow(WorkflowConfig(images=str(few_people), out="out", epochs=2, cnet_epochs=2,
                                             report_folds=2, report_synthetic=False))
    finally:
        runtime.disconnect()
    inputs = len(list(few_people.iterdir()))
    table = storage.read_table(str(out / "coefficients"))
    assert table.num_rows == inputs
    assert table.column("status").to_pylist().count("error") == 1
    for task in ("cnet", "identity", "expression"):
        assert (out / "models" / task / "model.pt").is_file(), task
    assert "gender" not in result["trained"]  # Yale names carry no gender
    report = out / "report"
    for name in ("table1_identity.md", "table2_expression.md", "table3_speed.md",
                 "confusion_expression.png", "confusion_identity.png", "confusion_identity.json"):
        assert (report / name).is_file(), name
    results = json.loads((report / "results.json").read_text())
    # The quick report: coefficient rows only (--full-report adds the raw-image baseline).
    assert set(results["summary"]) >= {"identity_cnet", "identity_mean", "expression"}
    assert "image_identity" not in results["summary"]
    for key in ("identity_cnet", "identity_mean", "expression"):
        assert 0.0 <= results["summary"][key]["accuracy"]["mean"] <= 1.0
    # Each shipped classifier is set beside the report row that measures its preset.
    assert set(result["bundle_checks"]) == {"identity", "expression"}
    # the shipped presets (their own inputs and heads) have their own rows, beside the paper's
    assert result["bundle_checks"]["identity"]["row"] == "identity_shipped"
    assert results["summary"]["identity_shipped"]["accuracy"]["mean"] >= 0.0
    assert "3DMM identity, C-Net aggregate" in (report / "table1_identity.md").read_text()
    captured = capfd.readouterr()  # file descriptors: Ray's own output to the terminal counts too
    printed = captured.out + captured.err
    assert "out/models" in printed and "report" in printed
    # Quiet by default: facedist's stage lines, not Ray's logs or its workers' output.
    lines = printed.splitlines()
    assert len(lines) <= 40, printed
    assert "Failed to query Ray Train Controller" not in printed
    assert "identity α C-Net" in printed and "shipped" in printed  # the report's one summary line
    assert "expression bundle: validation accuracy" in printed


def test_run_command_needs_images():
    with pytest.raises(SystemExit):
        main(["run", "--out", "x"])
