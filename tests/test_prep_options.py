"""One way to configure both CLIs: alexnet-prep's options are generated from its commands' config
dataclasses by pipeline/cli_common.py, as alexnet-train's are, so each default is written once."""

import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from alexnet.pipeline.cli_common import config_options, from_options, opt
from alexnet.tools.bench_pipeline import BenchPipelineConfig
from alexnet.tools.build_lmdb import BuildConfig
from alexnet.tools.cli import COMMANDS, main
from alexnet.tools.order import OrderConfig
from alexnet.tools.pca_stats import PcaStatsConfig
from alexnet.tools.preview import PreviewConfig
from alexnet.tools.sample import SampleConfig
from alexnet.tools.verify import VerifyConfig

CONFIGS = {
    "make-sample": [SampleConfig],
    "build-lmdb": [BuildConfig],
    "verify": [VerifyConfig],
    "pca-stats": [PcaStatsConfig],
    "preview": [PreviewConfig],
    "bench-pipeline": [BenchPipelineConfig],
    "order": [OrderConfig],
}


@dataclass(frozen=True)
class Dummy:
    source: Path  # an argument: no option
    count: int = opt(3, "A count.", min=1, max=9, aliases=("-c",))
    flag: bool = opt(False, "A flag.")
    on: bool = opt(True, "On by default.")
    parts: tuple[str, ...] = opt(("a", "b"), "Parts.", choices=(("a", "b"), ("a",)))
    where: Path = opt(Path("x.npz"), "A file.", type=click.Path(dir_okay=False, path_type=Path))
    hidden: int = opt(0, "Not on the command line.", cli=False)


@click.command()
@config_options(Dummy)
def dummy(**options):
    click.echo(repr(from_options(Dummy, options, source=Path("s"))))


def test_options_follow_the_fields():
    run = CliRunner().invoke
    assert run(dummy, []).output.strip() == repr(Dummy(Path("s")))
    r = run(dummy, ["-c", "9", "--flag", "--no-on", "--parts", "a", "--where", "y.npz"])
    assert r.output.strip() == repr(Dummy(Path("s"), 9, True, False, ("a",), Path("y.npz"))), r.output
    for bad in (["--count", "10"], ["--parts", "b"], ["--hidden", "1"], ["--source", "s"]):
        assert run(dummy, bad).exit_code == 2, bad


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_prep_option_is_a_config_field_with_its_default(command):
    """Every option of every command but --data-dir is a field of the command's configs, with its default."""
    cmd = main.get_command(click.Context(main), command)
    fields_by_name = {f.name: f for cls in CONFIGS[command] for f in fields(cls)}
    if command in ("bench-pipeline", "preview"):  # the trainer's data fields, as alexnet-train has them
        from alexnet.pipeline.loader import DataConfig

        fields_by_name.update({f.name: f for f in fields(DataConfig)})
    for param in cmd.params:
        if not isinstance(param, click.Option) or param.name in ("data_dir", "help"):
            continue
        f = fields_by_name[param.name]
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        assert param.default == shown and param.help == f.metadata["help"], (command, param.name)
    assert typing.get_type_hints(CONFIGS[command][0])  # resolvable annotations
