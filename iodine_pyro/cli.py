"""The ``iodine-pyro`` command line: the Typer app and its entry point, `main`.

The commands live in `iodine_pyro.commands`, one module per command group (`train`: fit,
ablate; `evaluate`; `posterior`: sample, compare; `plot`: one subcommand per figure;
`data`), the options they share in `commands.options`. `main` turns every error a user can
cause into one line on stderr, never a traceback, and exits with

- 2 for a usage error: an unknown option, a missing argument, a value out of range or not
  among the choices (the line ends with "see iodine-pyro COMMAND --help");
- 1 for a runtime failure: a missing or damaged file, a run that does not fit the data, a
  request larger than memory, training stopped by numerical faults;
- 130 when interrupted (Ctrl-C), after the work done so far is saved.

The library's errors name its parameters in backticks (`num_images`); `main` shows them as
the flags of the command that ran (``--num-images``).
"""

from __future__ import annotations

import logging
import os
import re
import sys

import typer

from .commands import data, evaluate, plot, posterior, train
from .commands.options import OptionError, UserError

# click's UsageError, the base of every usage error, reached through typer's public
# BadParameter (typer runs on its own copy of click; its module path is private)
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")

USAGE, FAILURE, INTERRUPTED = 2, 1, 130     # exit statuses

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"max_content_width": 120, "terminal_width": 120},
                  help="IODINE (Greff et al., 2019) as a Pyro program: train, evaluate, sample, plot.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Generate and inspect datasets.")
plot_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                       help="Draw one of the paper's figures of a trained run as a PNG (and the data behind it).")
app.add_typer(data_app, name="data")
app.add_typer(plot_app, name="plot")

train.register(app)
evaluate.register(app)
posterior.register(app)
plot.register(plot_app)
data.register(data_app)

__all__ = ["UserError", "app", "main"]


ONE_LINE = 400      # characters of an error message; longer ones end at a sentence


def _one_line(e: BaseException | str) -> str:
    """An error as one line: every line of its message joined (a message that wraps is not
    cut after its first line), an OS error with the file it concerns, at most `ONE_LINE`
    characters, cut at the end of a sentence where possible."""
    from .io import WriteError

    text = " ".join(str(e).split())
    if isinstance(e, OSError) and not isinstance(e, WriteError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else "error"
    if len(text) > ONE_LINE:
        cut = text.rfind(". ", 0, ONE_LINE)
        text = text[:cut + 1] if cut > ONE_LINE // 2 else text[:ONE_LINE - 4].rstrip() + " ..."
    return text


def main(argv: list[str] | None = None) -> None:
    """Entry point: a usage error prints one line and exits with status 2, a runtime failure
    one line and status 1, never a traceback; Ctrl-C prints one line and exits with 130."""
    from .threads import prepare_environment

    prepare_environment()                                # before torch is imported: threads sleep while they wait
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    rank0 = int(os.environ.get("RANK", "0")) == 0        # under torchrun, rank 0 speaks for all
    try:
        code = app(args=argv, standalone_mode=False, prog_name="iodine-pyro")
    except UsageError as e:                              # bad option, missing argument, bad value
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            typer.echo(e.ctx.get_help())                 # a bare command: its help
        elif rank0:
            where = f"; see {e.ctx.command_path} --help" if e.ctx is not None else ""
            message = e.message if isinstance(e, OptionError) else e.format_message()
            typer.echo(f"error: {_one_line(message).rstrip('.')}{where}", err=True)
        sys.exit(USAGE)
    except (typer.Abort, KeyboardInterrupt):
        if rank0:
            typer.echo("interrupted", err=True)
        sys.exit(INTERRUPTED)
    except (UserError, ValueError, OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _users_to_fix(e):
            raise
        if rank0:
            typer.echo(f"error: {_as_flags(_one_line(e), argv)}", err=True)
        sys.exit(FAILURE)
    if code == INTERRUPTED and rank0:                            # typer turns Ctrl-C into exit status 130
        typer.echo("interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)


# library parameters whose command-line option has another name
PARAMETER_OPTIONS = {"merge": "merge_scenes"}


def _as_flags(text: str, argv: list[str] | None) -> str:
    """A library message as the command line says it: each parameter named in backticks
    (`num_images`) becomes the option of the command in `argv` that sets it (--num-images);
    a name the command has no option for keeps its backticks."""
    command = typer.main.get_command(app)
    for word in (sys.argv[1:] if argv is None else argv):
        sub = getattr(command, "commands", {}).get(word)
        if sub is None and hasattr(command, "commands") and not word.startswith("-"):
            break
        command = sub or command
    options = {p.name: max(p.opts, key=len) for p in getattr(command, "params", [])
               if getattr(p, "param_type_name", "") == "option" and p.opts}

    def flag(m: re.Match) -> str:
        name = m.group(1)
        return options.get(PARAMETER_OPTIONS.get(name, name), m.group(0))

    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", flag, text)


def _users_to_fix(e: RuntimeError) -> bool:
    """Runtime errors that are the user's to fix: training stopped by numerical faults, and
    requests larger than memory."""
    from .training import TrainingError   # only once an error has happened

    text = str(e)
    return isinstance(e, TrainingError) or "out of memory" in text.lower() or "DefaultCPUAllocator" in text
