"""`vitnas` command line: parse, call the library, print. Owns no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from nas.errors import UserError

EPILOG = """\
typical session:
  vitnas space show psvit-digits                 # what a space holds
  vitnas train-supernet --space psvit-digits --data digits --epochs 30
  vitnas demo                                    # the whole pipeline on the embedded digits data

Every command takes --help. Spaces are YAML files; the shipped ones can be named without a path.
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except UserError as err:
        print(f"vitnas: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitnas: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitnas",
        description="Hardware-aware architecture search over efficient Vision Transformers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from nas import __version__

    parser.add_argument("--version", action="version", version=f"vitnas {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


# -- vitnas space ----------------------------------------------------------------------------
def _space_commands(sub) -> None:
    space = sub.add_parser("space", help="inspect search spaces", description="Inspect search-space files.")
    space_sub = space.add_subparsers(title="space commands", metavar="SUBCOMMAND")
    show = space_sub.add_parser(
        "show",
        help="print a space's choices, member count, largest and smallest architecture",
        description="Validate a search-space file and print what it holds.",
    )
    show.add_argument("file", help="a space YAML file, or the name of a shipped space (e.g. psvit-digits)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(run=_space_show)
    ls = space_sub.add_parser("list", help="list the shipped spaces")
    ls.set_defaults(run=_space_list)
    space.set_defaults(run=lambda _args: space.print_help() or 2)


def _space_show(args) -> int:
    from nas.space import load_space

    space = load_space(args.file)
    largest, smallest = space.largest(), space.smallest()
    info = {
        "name": space.name,
        "source": space.source,
        "family": space.family,
        "members": space.count(),
        "choices": space.describe(),
        "largest": largest.to_dict(),
        "smallest": smallest.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from nas.report import format_space

    print(format_space(space, largest, smallest))
    return 0


def _space_list(_args) -> int:
    from nas.space import load_space, shipped_spaces

    for name in shipped_spaces():
        space = load_space(name)
        print(f"{name:<20} {space.family:<6} {space.count():>16,} members  {space.spec.description}")
    return 0


COMMANDS: list[Callable] = [_space_commands]


if __name__ == "__main__":
    sys.exit(main())
