"""``quantlab`` command line: one module per subcommand, each with ``add_arguments`` and ``run``.

Exit codes: 0 success, 2 bad input or usage, 3 quality budget missed, 1 internal error,
130 interrupted, 143 terminated.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import signal
import sys
import traceback

from quantlab import __version__
from quantlab.errors import InputError, QualityBudgetError

SUBCOMMANDS = {
    "bench": "quantlab.cli.bench",
    "convert": "quantlab.cli.convert",
    "distill": "quantlab.cli.distill",
    "eval": "quantlab.cli.eval",
    "generate": "quantlab.cli.generate",
    "inspect": "quantlab.cli.inspect",
    "package": "quantlab.cli.package",
    "sweep": "quantlab.cli.sweep",
    "verify": "quantlab.cli.verify",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quantlab", description="Quantize and compile LLM checkpoints to ONNX.")
    parser.add_argument("--version", action="version", version=f"quantlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (passes, files written)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        print(f"quantlab: error: {e.one_line()}", file=sys.stderr)
        return 2
    except QualityBudgetError as e:
        print(f"quantlab: quality budget missed: {e}", file=sys.stderr)
        return 3
    except BrokenPipeError:  # the reader went away (`quantlab inspect X | head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("quantlab: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # a bug in quantlab, not in the user's input
        traceback.print_exc()
        print(f"quantlab: internal error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1


def entry() -> None:
    code = main()
    if code == 130:
        # Interrupted, cleaned up and reported: exit 130 now. Left to interpreter shutdown, the process was
        # seen (about 1 run in 40, under load) to die by SIGINT after printing "interrupted", which a caller
        # reads as a crash. A second Ctrl-C during the exit handlers is ignored for the same reason.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
