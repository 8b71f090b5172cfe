"""``python -m semantic.models fetch NAME...`` / ``python -m semantic.models list``."""

from __future__ import annotations

import argparse
import sys

from semantic.models import MODELS, cache_root, fetch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semantic.models", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="download and convert models, print their folders")
    fetching.add_argument("names", nargs="+", choices=sorted(MODELS))
    commands.add_parser("list", help="the models this package can fetch")
    args = parser.parse_args(argv)
    if args.command == "list":
        print(f"cache: {cache_root()}")
        for source in MODELS.values():
            print(f"{source.name:<24} {source.licence:<12.12} {source.description}")
        return 0
    for name in args.names:
        print(fetch(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
