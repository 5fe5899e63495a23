"""The `clipmoe` command line: one entry point, one sub-command module per command group.

Conventions (every command): each sub-parser sets `func`; bad input (an argument or a file the user named) raises
UsageError, ValueError or FileNotFoundError and is printed as one line naming it, exit status 2; anything else is a
bug and keeps its traceback (exit 1). `-v`/`-q` set the `clipmoe` logger's level; defaults appear in `--help`.
"""
import sys

import clipmoe
from clipmoe.cli import demo, encode, eval, pipeline, tools
from clipmoe.cli.common import Parser, UsageError, configure_logging

COMMAND_MODULES = (pipeline, eval, encode, demo, tools)
BAD_INPUT = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser() -> Parser:
    parser = Parser(prog="clipmoe", description=clipmoe.__doc__)
    parser.add_argument("--version", action="version", version=f"clipmoe {clipmoe.__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=0,
                           help="debug messages")
    verbosity.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                           help="warnings and results only, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbosity)
    try:
        return args.func(args) or 0
    except BAD_INPUT as exc:
        print(f"clipmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
