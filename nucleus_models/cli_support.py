"""What every Slicer CLI script of the project shares: parsing and clean failures.

A CLI script is ``main(args)`` plus ``run_cli(main, __file__)``: the XML next
to the script defines the parameters (slicer_cli_web's parser), any
:class:`~nucleus_models.errors.NucleusModelsError` becomes one line on stderr
and exit status 2, and logging goes to stderr (stdout carries only the
``<filter-progress>`` lines slicer_cli_web reads).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, NoReturn

from .errors import NucleusModelsError

__all__ = [
    "Terminated",
    "build_parser",
    "fail",
    "handle_termination",
    "join_negative_values",
    "run_cli",
    "stdout_closed",
]

log = logging.getLogger("nucleus_models.cli")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit."""
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(code)


#: what a value of each Slicer parameter type must look like
_EXPECTED = {
    "integer": "a whole number",
    "float": "a number",
    "double": "a number",
    "boolean": "true or false",
    "region": "numbers: left,top,width,height in base pixels, polygon vertices "
    "x1,y1,x2,y2,..., or -1,-1,-1,-1 for the whole slide",
    "integer-vector": "comma-separated whole numbers",
    "float-vector": "comma-separated numbers",
    "double-vector": "comma-separated numbers",
}
#: argparse's words for a value its type function (ctk_cli's parseValue) refused
_TYPE_ERROR = re.compile(r"^argument (?P<flag>\S+): invalid parseValue value: (?P<value>.*)$")


def _explained(message: str, xml_path: str) -> str:
    """argparse's ``invalid parseValue value: 'x'`` as what the value should be."""
    m = _TYPE_ERROR.match(message)
    if not m:
        return message
    from ctk_cli import CLIModule

    flags = m["flag"].split("/")
    for p in CLIModule(xml_path).parameters():
        if p.longflag and f"--{p.longflag.lstrip('-')}" in flags and p.typ in _EXPECTED:
            label = f" ({p.label})" if p.label else ""
            return f"argument {m['flag']}{label}: {m['value']}: expected {_EXPECTED[p.typ]}"
    return f"argument {m['flag']}: invalid value {m['value']}"


def build_parser(xml_path: str) -> Any:
    """slicer_cli_web's argument parser for ``xml_path``, failing in one line."""
    from slicer_cli_web import CLIArgumentParser

    class _Parser(CLIArgumentParser):  # type: ignore[misc, valid-type]
        def add_argument(self, *args: Any, **kwargs: Any) -> Any:
            # ctk_cli passes each XML description as argparse help, which
            # argparse formats with %: a "%" in one (a site's model
            # description, "40 % of our cohort", joins the model menu) made
            # --help end in a traceback
            if isinstance(kwargs.get("help"), str):
                kwargs["help"] = kwargs["help"].replace("%", "%%")
            return super().add_argument(*args, **kwargs)

        def error(
            self, message: str
        ) -> NoReturn:  # argparse prints usage + error; we print one line
            fail(f"{os.path.basename(xml_path)[:-4]}: {_explained(message, xml_path)}")

        def _print_message(self, message: str, file: Any = None) -> None:
            # argparse's own (--help, --version) swallows a write's OSError, so
            # into a closed pipe they exited 0 where --xml exits 141: written
            # and flushed here, a closed pipe raises BrokenPipeError for
            # run_cli to stop on quietly (stdout_closed), as --xml does
            if not message:
                return
            file = file or sys.stderr
            try:
                file.write(message)
                file.flush()
            except BrokenPipeError:
                raise
            except (AttributeError, OSError):  # no file to write to (argparse's own)
                pass

    return _Parser(xml_path)


def stdout_closed(code: int = 141) -> NoReturn:
    """Exit quietly when stdout's reader has gone (``... --xml | head`` once
    head has its lines), as ``cat`` does, with the shell's status for
    SIGPIPE: printing went on into a ``BrokenPipeError`` traceback, and a
    second one when Python flushed stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no stdout file to replace
        pass
    raise SystemExit(code)


class Terminated(BaseException):
    """SIGTERM arrived (a job cancelled in HistomicsUI, ``docker stop``)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def handle_termination() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread.

    Cancelling a job stops its container with SIGTERM. Python ignores it as
    a container's first process (and dies at once elsewhere), so ``finally``
    blocks never ran: downloaded slides stayed in the temporary folder and a
    folder job's lease held the folder. Raised as an exception, they run.
    """
    import signal

    signal.signal(signal.SIGTERM, _terminate)


#: a comma-separated list of numbers, e.g. the whole-slide region "-1,-1,-1,-1"
_NUMBER_LIST = re.compile(r"^-[0-9.]+(?:e-?[0-9]+)?(?:,\s*-?[0-9.]+(?:e-?[0-9]+)?)+$", re.I)


def join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1,-1,-1,-1`` as ``--flag=-1,-1,-1,-1``.

    argparse takes a value that starts with ``-`` for an option unless it
    is one number, so a region or vector starting with a negative number
    (the whole-slide region of a cron line or a shell) was refused with
    "expected one argument". slicer_cli_web passes ``-1, -1, -1, -1``, whose
    spaces argparse already accepts.
    """
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if (
            _NUMBER_LIST.match(arg)
            and prev.startswith("--")
            and "=" not in prev
            and prev != "--"
            and "--" not in out[:-1]
        ):
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


def log_level(default: str = "WARNING") -> str:
    """``$NUCLEUS_LOG_LEVEL`` (``debug`` as well as ``DEBUG``), else ``default``;
    an unknown level is a one-line error, not a traceback from logging."""
    given = os.environ.get("NUCLEUS_LOG_LEVEL", "").strip()
    name = (given or default).upper()
    if not isinstance(logging.getLevelName(name), int):
        fail(f"NUCLEUS_LOG_LEVEL={given!r}: expected DEBUG, INFO, WARNING or ERROR")
    return name


def run_cli(main: Callable[[Any], Any], script_file: str) -> None:
    """Parse ``sys.argv`` with the XML beside ``script_file`` and run ``main``."""
    logging.basicConfig(
        level=log_level(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("large_image", "distributed", "tornado", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handle_termination()
    parser = build_parser(os.path.splitext(os.path.abspath(script_file))[0] + ".xml")
    try:  # --xml, --help and --version print here
        args = parser.parse_args(join_negative_values(sys.argv[1:]))
    except BrokenPipeError:
        stdout_closed()
    try:
        main(args)
    except NucleusModelsError as exc:
        fail(str(exc))
    except MemoryError:
        fail("out of memory: use a smaller analysis_tile_size or batch_size")
    except BrokenProcessPool:  # the system killed a pipeline worker, mostly for memory
        fail(
            "a post-processing worker process died (killed, e.g. for memory):"
            " use fewer num_workers, or the scheduler 'multithreading'"
        )
    except RuntimeError as exc:
        # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) is a
        # RuntimeError; matched by name so that this module needs no torch
        if type(exc).__name__ != "OutOfMemoryError":
            raise
        fail("GPU out of memory: use a smaller batch_size or analysis_tile_size")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Terminated:
        fail("terminated (SIGTERM: the job was cancelled or its container stopped)", 143)
    except OSError as exc:  # a full disk, a folder that vanished, permissions
        log.debug("OSError", exc_info=True)
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"{exc.strerror or str(exc) or type(exc).__name__}{where}")
