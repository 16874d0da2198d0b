"""Pieces shared by the two command-line tools (``alexnet-prep`` and ``alexnet-train``).

Commands stay thin: parse, build a config, call one function. User-facing
failures raise :class:`~alexnet.pipeline.errors.AlexnetError` and become one
line on stderr with exit status 1; Ctrl-C becomes exit 130 with a hint to resume.
"""

from __future__ import annotations

import errno
import importlib
import sys
import typing
from dataclasses import MISSING, field, fields
from importlib import metadata
from pathlib import Path

import click

from .artifacts import DATA_DIR_ENV, DEFAULT_DATA_DIR
from .errors import AlexnetError


def package_version() -> str:
    try:
        return metadata.version("alexnet")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


# The fix for a file-system failure a command did not name itself, by errno.
OS_FIXES = {
    errno.ENOSPC: "free some space (or choose another directory) and run the same command again",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EACCES: "choose a path you can write (or read)",
    errno.EROFS: "the file system is read-only: choose another directory",
}


# --------------------------------------------------------------------------- options from config dataclasses


def opt(default, help, **extra):
    """A config field whose metadata carries its meaning and unit (the command-line help) and its
    checks (``min``, ``max``, ``choices``); ``aliases`` adds option names, ``cli=False`` keeps it off
    the command line, ``type`` gives the click type outright. Both CLIs' configs are made of these."""
    return field(default=default, metadata={"help": help, **extra})


def field_problems(obj) -> list[str]:
    """What breaks the fields' ``min``, ``max`` and ``choices`` in a config dataclass (empty if nothing)."""
    out = []
    for f in fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        over = "max" in meta and (value >= meta["max"] if meta.get("max_open") else value > meta["max"])
        if ("min" in meta and value < meta["min"]) or over:
            close = ")" if meta.get("max_open") else "]"
            out.append(
                f"{f.name} must be in [{meta.get('min', '-inf')}, {meta.get('max', 'inf')}{close}, not {value!r}"
            )
        if "choices" in meta and value not in meta["choices"]:
            out.append(f"{f.name} must be one of {', '.join(meta['choices'])}, not {value!r}")
    return out


def _split_tuple(kind):
    """A click callback turning ``"a,b"`` into ``(kind(a), kind(b))``."""

    def parse(_ctx, _param, value):
        if value is None or isinstance(value, tuple):
            return value
        try:
            return tuple(kind(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values") from None

    return parse


def field_option(f, hint, override: dict | None = None, **extra):
    """The click option of config field ``f`` (annotation ``hint``): its name, default, help and checks.
    ``override``: a command's own help (and default) for a field it reads in its own terms; ``extra``:
    further click arguments (an ``envvar``)."""
    meta = f.metadata
    name = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not MISSING else f.default_factory()
    kw = {"default": default, "help": meta.get("help"), "show_default": default not in ("", None)} | extra
    kw |= override or {}
    default = kw["default"]
    if hint is bool:
        return click.option(f"{name}/--no-{name[2:]}", f.name, **kw)
    choices = meta.get("choices")
    if typing.get_origin(hint) is tuple:  # "a,b" on the command line
        kw.update(
            default=None if default is None else ",".join(map(str, default)),
            callback=_split_tuple(typing.get_args(hint)[0]),
        )
        choices = choices and [",".join(map(str, c)) for c in choices]
        hint = str
    if "type" in meta:
        kw["type"] = meta["type"]
    elif choices:
        kw["type"] = click.Choice(choices)
    elif hint in (int, float) and ("min" in meta or "max" in meta):
        bounds = {"min": meta.get("min"), "max": meta.get("max")} | ({"max_open": True} if meta.get("max_open") else {})
        kw["type"] = (click.IntRange if hint is int else click.FloatRange)(**bounds)
    else:
        kw["type"] = hint
    return click.option(name, *meta.get("aliases", ()), f.name, **kw)


def config_options(cls, only: tuple[str, ...] | None = None):
    """One option per field of the config dataclass ``cls`` (or the fields named in ``only``), in its
    order; fields made without :func:`opt` (a command's arguments) and ``cli=False`` ones are left out."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for f in reversed(fields(cls)):
            if "help" in f.metadata and f.metadata.get("cli", True) and (only is None or f.name in only):
                command = field_option(f, hints[f.name])(command)
        return command

    return decorate


def from_options(cls, options: dict, **given):
    """``cls`` made from ``given`` and the options that are its fields (taken out of ``options``)."""
    return cls(**given, **{f.name: options.pop(f.name) for f in fields(cls) if f.name in options})


# --------------------------------------------------------------------------- the group


class Group(click.Group):
    """A click group that turns the project's errors into one clear line and a non-zero exit."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("\ninterrupted: run the same command again to resume", err=True)
            sys.exit(130)
        except AlexnetError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            fix = OS_FIXES.get(e.errno, "")
            click.echo(f"error: {e.strerror or e}{where}{'; ' + fix if fix else ''}", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def data_dir_option(f):
    """``--data-dir DIR`` with ``$ALEXNET_DATA_DIR`` and the documented default ``./data``."""
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar=DATA_DIR_ENV,
        default=DEFAULT_DATA_DIR,
        show_default=True,
        show_envvar=True,
        help="Dataset directory (manifest.json, stats.json, mean_image.npy, LMDB shards).",
    )(f)


class LazyGroup(Group):
    """A group whose subcommands live in their own modules, imported only when used.

    ``lazy_commands`` maps a command name to ``"module.path:attribute"``.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module, _, attr = self.lazy_commands[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


def versions_report(prog: str) -> str:
    """``--version`` text: this package, the active PIL, and the other key libraries."""
    from . import dali
    from .images import pil_summary  # PIL (pillow-simd) is a requirement: no "not installed" case

    lines = [f"{prog} {package_version()}", f"PIL: {pil_summary()}"]
    for dist in ("torch", "lmdb", "numpy"):
        try:
            lines.append(f"{dist}: {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{dist}: not installed")
    lines.append(f"DALI: {dali.installed()}")
    return "\n".join(lines)


def version_option(prog: str):
    def callback(ctx, _param, value):
        if not value or ctx.resilient_parsing:
            return
        from .images import pil_info

        click.echo(versions_report(prog))
        if not pil_info()["simd"]:
            click.echo("warning: plain Pillow has shadowed pillow-simd (see README, 'pillow-simd')", err=True)
        ctx.exit()

    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=callback,
        help="Show versions (package, active PIL, torch, DALI) and exit.",
    )
