"""The command line says what it does: real defaults and choices in every help, bad values
refused before Ray starts, `report --out s3://` writing to S3. No Ray cluster here."""

from __future__ import annotations

import argparse

import pytest

from facedist import storage
from facedist.cli import build_parser, main

COMMANDS = ("extract", "predict", "train", "report", "texture", "serve", "run", "models", "gallery")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_flag_has_help_with_its_real_default(monkeypatch):
    from facedist.reports.image import ReportConfig
    from facedist.serving.settings import ServeSettings
    from facedist.training.presets import describe_presets, preset_value

    monkeypatch.setenv("COLUMNS", "400")  # one line per flag
    commands = _subparsers(build_parser())
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        assert "default: ReportConfig" not in command.format_help(), name
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    report = commands["report"].format_help()
    assert f"k-fold split by image (default: {ReportConfig.folds})" in report
    # Training settings left unset come from the task presets, and the help says which.
    assert f"(default: the preset's, {preset_value('image_identity', 'image_size')})" in report
    from facedist.training.tasks import COEFFICIENT_TASKS

    # --epochs sets the coefficient classifiers only, and its help names only theirs.
    assert (f"(default: the presets', {describe_presets('epochs', COEFFICIENT_TASKS)})"
            in commands["run"].format_help())
    assert f"TrainConfig.batch_size (default: {describe_presets('batch_size')})" in commands["train"].format_help()
    assert f"(default: {ServeSettings.max_batch_size})" in commands["serve"].format_help()


def test_flags_parse_to_the_types_the_settings_take():
    parser = build_parser()
    train = parser.parse_args(["train", "--task", "identity", "--data", "x", "--output", "y",
                               "--max-combos-per-epoch", "100", "--patience", "3"])
    assert train.max_combos_per_epoch == 100 and train.patience == 3
    several = parser.parse_args(["train", "--task", "cnet", "identity", "expression", "--data", "x", "--output", "y"])
    assert several.task == ["cnet", "identity", "expression"]
    assert parser.parse_args(["serve", "--replica-retries", "0"]).replica_retries == 0  # 0: off


@pytest.mark.parametrize("argv", [["serve", "--replica-retries", "-1"],
                                  ["train", "--task", "identity", "--data", "x", "--output", "y",
                                   "--max-combos-per-epoch", "-5"]])
def test_a_negative_count_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_choices_come_from_the_registries():
    from facedist.datasets import DATASETS
    from facedist.detection import DETECTORS
    from facedist.extractors.backends import list_backends
    from facedist.training.task_registry import TASKS
    from facedist.training.tasks import INPUT_NORMS

    commands = _subparsers(build_parser())
    choices = {(name, a.dest): tuple(a.choices) for name, c in commands.items() for a in c._actions if a.choices}
    from facedist.gallery.embedding import EMBEDDING_TASK

    assert choices[("train", "task")] == (*TASKS, EMBEDDING_TASK)
    assert choices[("train", "input_norm")] == tuple(INPUT_NORMS)
    assert choices[("run", "backend")] == list_backends()
    assert choices[("serve", "detector")] == tuple(DETECTORS)
    assert choices[("extract", "dataset")] == choices[("run", "dataset")] == tuple(DATASETS)


@pytest.mark.parametrize("argv", [
    ["train", "--task", "bogus", "--data", "x", "--output", "y"],
    ["run", "--images", "x", "--out", "y", "--actors", "0"],
    ["report", "--data", "x", "--folds", "-1"],
    ["serve", "--max-batch-size", "0"],
    ["run", "--images", "x", "--out", "y", "--backend", "nope"],
])
def test_a_bad_flag_value_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["run", "--images", "{tmp}/missing", "--out", "{tmp}/out"],
    ["train", "--task", "expression", "--data", "{tmp}/missing", "--output", "{tmp}/out"],
    # One run name cannot name several runs.
    ["train", "--task", "cnet", "identity", "--name", "x", "--data", "{tmp}", "--output", "{tmp}/out"],
    ["report", "--data", "{tmp}/missing", "--out", "{tmp}/report"],
    ["serve", "--models", "{tmp}/missing"],
    ["predict", "{tmp}/missing", "--models", "{tmp}", "--out", "{tmp}/out"],
    ["predict", "{tmp}", "--models", "{tmp}/missing", "--out", "{tmp}/out"],
    ["run", "--images", "{tmp}", "--out", "{tmp}/out", "--backend", "tddfa", "--landmarks", "dlib"],
    ["serve", "--texture-basis", "{tmp}/missing.npz"],
    ["run", "--images", "{tmp}", "--out", "{tmp}/out", "--no-texture", "--texture-basis", "{tmp}/basis.npz"],
])
def test_a_bad_value_fails_before_ray_starts(argv, tmp_path, capsys):
    import ray

    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert "facedist:" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # trains the report's models
def test_report_out_s3_writes_to_the_bucket(s3_bucket, tmp_path, monkeypatch, capsys):
    from facedist.schema import YALE_EXPRESSIONS
    from facedist.training.synthetic import SyntheticConfig, synthetic_table

    monkeypatch.chdir(tmp_path)
    table, _ = synthetic_table(SyntheticConfig(n_people=6, images_per_person=6, seed=1), expressions=YALE_EXPRESSIONS)
    storage.write_table(table, str(tmp_path / "coeffs" / "part-0.parquet"))
    out = f"{s3_bucket}/report"
    assert main(["report", "--data", str(tmp_path / "coeffs"), "--out", out, "--folds", "2", "--coeff-epochs", "1",
                 "--cnet-epochs", "1", "--no-images", "--no-synthetic"]) == 0
    for name in ("table1_identity.md", "table2_expression.md", "results.json", "confusion_identity.png"):
        assert storage.exists(f"{out}/{name}"), name
    assert not (tmp_path / "s3:").exists()  # once a local folder named "s3:"
    printed = capsys.readouterr().out
    assert "3DMM identity, C-Net aggregate" in printed and f"report written to {out}" in printed


def test_the_extraction_flags_are_declared_once():
    """`facedist extract`, `facedist run` and jobs/extract.py take the same extractor and extraction
    flags; each shows the defaults of the settings it fills."""
    import importlib.util
    from pathlib import Path

    from facedist.extraction.distributed import RayExtractConfig
    from facedist.workflow import WorkflowConfig

    script = Path(__file__).resolve().parents[1] / "jobs" / "extract.py"
    spec = importlib.util.spec_from_file_location("extract_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    commands = _subparsers(build_parser())
    flags = lambda parser: {s: a.default for a in parser._actions for s in a.option_strings}  # noqa: E731
    extract, run, job_flags = flags(commands["extract"]), flags(commands["run"]), flags(job.build_parser())
    shared = set(extract) - {"--ray", "--out", "--verbose", "-h", "--help"}
    assert shared <= set(job_flags) and shared - {"--endpoint"} <= set(run)
    assert extract["--batch-size"] == job_flags["--batch-size"] == RayExtractConfig().extract.batch_size
    assert run["--batch-size"] == WorkflowConfig.default_extraction().extract.batch_size
    assert extract["--actors"] == RayExtractConfig.actors
