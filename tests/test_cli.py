"""Both command-line tools: --help with examples, --version with the active PIL, clean errors."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from alexnet.pipeline.images import pil_info
from alexnet.tools.cli import main as prep

BIN = Path(sys.executable).parent


def test_prep_help_lists_commands_with_examples():
    r = CliRunner().invoke(prep, ["--help"])
    assert r.exit_code == 0
    for cmd in ("make-sample", "build-lmdb", "pca-stats", "verify", "preview", "bench-pipeline"):
        assert cmd in r.output
    assert "Examples:" in r.output


def test_prep_version_reports_pil():
    r = CliRunner().invoke(prep, ["--version"])
    assert r.exit_code == 0
    assert "PIL: pillow-simd" in r.output or "PIL: Pillow" in r.output
    assert "torch:" in r.output and "DALI: nvidia-dali-cuda130 " in r.output


def test_pillow_simd_is_the_active_pil():
    """The set-up must leave pillow-simd active (plain Pillow installed later would shadow it)."""
    info = pil_info()
    assert info["simd"], f"plain Pillow {info['version']} shadows pillow-simd"
    assert ".post" in str(info["version"])


def test_console_scripts_installed_and_fast_errors(tmp_path):
    for script in ("alexnet-prep", "alexnet-train"):
        r = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Examples:" in r.stdout
    # Bad input: one clear line on stderr, non-zero exit, no traceback.
    r = subprocess.run(
        [str(BIN / "alexnet-prep"), "pca-stats", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_prep_warns_when_plain_pillow_shadows_simd(monkeypatch):
    import alexnet.pipeline.images as pil

    monkeypatch.setattr(pil, "pil_info", lambda: {"version": "12.0.0", "simd": False, "libjpeg": "x", "name": "Pillow"})
    r = CliRunner().invoke(prep, ["make-sample", "--help"])
    assert r.exit_code == 0
    assert "plain Pillow 12.0.0 has shadowed pillow-simd" in r.output


# Each alexnet-train command takes only its own options: a training option elsewhere is click's
# "No such option" (exit 2), and the command's own options are listed in its --help.
OWN_OPTIONS = {
    "eval": (["--lr", "5"], ["--checkpoint", "--ten-crop", "--data-dir", "--batch-size", "--mean", "--threads"]),
    "bench": (["--epochs", "3"], ["--steps", "--lr", "--batch-size", "--lrn", "--threads", "--precision", "--compile"]),
    "predict": (["--lr", "5"], ["--checkpoint", "--ten-crop", "--gpus", "--batch-size"]),
    "export": (["--lr", "5"], ["--checkpoint", "--out"]),
    "report": (["--lr", "5"], ["--checkpoint", "--out", "--preview"]),
}


@pytest.mark.parametrize("command", list(OWN_OPTIONS))
def test_each_command_takes_only_its_own_options(command):
    from alexnet.trainer.cli import main

    foreign, own = OWN_OPTIONS[command]
    r = CliRunner().invoke(main, [command, *foreign])
    assert r.exit_code == 2 and f"No such option '{foreign[0]}'" in r.output, r.output
    r = CliRunner().invoke(main, [command, "--help"])
    assert r.exit_code == 0
    assert all(o in r.output for o in own), r.output
    assert foreign[0] + " " not in r.output
