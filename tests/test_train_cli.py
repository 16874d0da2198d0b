"""``alexnet-train``'s command line: help, one-line errors, options from the config, sub-commands."""

from __future__ import annotations

from click.testing import CliRunner

from alexnet.trainer.config import TrainConfig


def test_cli_help_and_version():
    from alexnet.trainer.cli import main

    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0, r.output
    assert "Examples:" in r.output and "alexnet-train eval" in r.output and "torchrun" in r.output
    for command in ("eval", "bench", "report", "predict", "export"):
        assert command in r.output
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "torch" in r.output


def test_cli_missing_dataset_is_one_line(tmp_path):
    from alexnet.trainer.cli import main

    r = CliRunner().invoke(
        main, ["--data-dir", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r"), "--gpus", "cpu"]
    )
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and "manifest.json" in r.output and "Traceback" not in r.output


def test_cli_refuses_to_overwrite_or_change_a_run(uninterrupted, train_data):
    from alexnet.trainer.cli import main

    run, _ = uninterrupted
    base = ["--data-dir", str(train_data), "--run-dir", str(run), "--gpus", "cpu", "--no-progress"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 1 and "--resume" in r.output
    r = CliRunner().invoke(main, [*base, "--resume", "--lr", "0.5"])
    assert r.exit_code == 1 and "lr" in r.output and "Traceback" not in r.output


def test_cli_bench_prints_both_rates_and_ratio(train_data):
    from alexnet.trainer.cli import main

    args = ["--data-dir", str(train_data), "--gpus", "cpu", "--batch-size", "2", "--threads", "1"]
    r = CliRunner().invoke(main, ["bench", *args, "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "synthetic batches" in r.output and "pipeline batches" in r.output and "ratio" in r.output


def test_cli_options_are_the_config_fields():
    """Every config field has its option in training (eval and bench: the fields they use), with the
    dataclass default, and no option lacks a field."""
    from dataclasses import fields

    from alexnet.trainer.cli import BENCH_OPTIONS, EVAL_HELP, EVAL_OPTIONS, bench_command, eval_command, main
    from alexnet.trainer.config import SECTIONS

    every = {f.name for cls in SECTIONS.values() for f in fields(cls) if f.metadata.get("cli", True)}
    for command, extra, names in (
        (main, {"config_file", "version"}, every),
        (eval_command, {"checkpoints", "ten_crop", "split"}, every & EVAL_OPTIONS),
        (bench_command, {"config_file", "steps"}, every & BENCH_OPTIONS),
    ):
        options = {p.name: p for p in command.params}
        assert set(options) - extra == names
        defaults = TrainConfig().flat()
        for name in names:
            default = options[name].default
            if command is eval_command and "default" in EVAL_HELP.get(name, {}):
                assert default is None, name  # the checkpoint decides
                continue
            assert default == (",".join(map(str, defaults[name])) if name == "step_epochs" else defaults[name]), name


def test_cli_config_file_reruns_a_run_with_fields_overridden(tmp_path, monkeypatch):
    """--config RUN/config.json starts a NEW run from the saved tree (not that run's directory, even
    if it was a resumed run's); typed options override single fields."""
    from alexnet.trainer import cli

    saved = TrainConfig.create(lr=0.005, batch_size=64, lrn="paper-text", num_threads=2)
    saved.replace(run_dir="runs/a", resume=True, num_classes=4).save(tmp_path / "config.json")
    seen = []

    def fake_train(config):  # records the config instead of training (the CLI's job ends at building it)
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("alexnet.trainer.train.train", fake_train)
    r = CliRunner().invoke(cli.main, ["--config", str(tmp_path / "config.json"), "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert seen == [saved.replace(seed=3)]  # run_dir "" (a new timestamped run), resume off
    r = CliRunner().invoke(cli.main, ["--config", str(tmp_path / "config.json"), "--resume"])
    assert r.exit_code == 2 and "--resume continues the run in --run-dir" in r.output


def test_cli_misplaced_options_are_one_line():
    from alexnet.trainer.cli import main

    r = CliRunner().invoke(main, ["--lr", "0.1", "eval"])
    assert r.exit_code == 2 and "options go after the command: alexnet-train eval --lr" in r.output
    assert "Traceback" not in r.output


def test_report_subcommand_is_registered():
    from alexnet.trainer.cli import main

    r = CliRunner().invoke(main, ["report", "--help"])
    assert r.exit_code == 0, r.output
