"""Cut files (the model wheels) into pieces small enough for a machine reached only through calls that
carry a few tens of MB each; ``tools/gpu_real_models.sh`` puts them back together there.

    python tools/split_for_device.py --to .gpu-pieces --piece-mb 28 --per-call-mb 56 .whl/*.whl .whl/extras/*.whl

Each file becomes ``<name>.part00``, ``<name>.part01``, ... (``cat`` of them in name order is the file).
With ``--per-call-mb`` the pieces are dealt into ``call01/``, ``call02/``, ... of at most that many MiB
each (the last ones the smallest): one folder per call. Prints each folder with its size. Nothing is hashed here:
``semantic.models.fetch`` checks the reassembled wheels against their pinned SHA-256.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import List, Tuple

MIB = 1 << 20
MAX_PIECES = 100  # two digits: name order is piece order


def split(files: List[pathlib.Path], to: pathlib.Path, piece_bytes: int,
          call_bytes: int = 0) -> List[Tuple[pathlib.Path, int]]:
    """Write the pieces; returns ``(folder, bytes)`` of each call folder (``to`` alone without ``call_bytes``).
    Pieces are dealt largest first into the first folder with room (first-fit decreasing: few calls, the
    last ones the smallest)."""
    if to.exists() and any(to.iterdir()):  # old pieces of another size would be reassembled with the new
        raise ValueError(f"{to} is not empty: remove it first")
    if call_bytes and call_bytes < piece_bytes:
        raise ValueError(f"a call ({call_bytes} bytes) must hold at least one piece ({piece_bytes} bytes)")
    pieces = []  # (length, file, index)
    for path in files:
        size = path.stat().st_size
        count = max(1, -(-size // piece_bytes))
        if count > MAX_PIECES:
            raise ValueError(f"{path} would make {count} pieces, more than {MAX_PIECES}: choose larger pieces")
        pieces += [(min(piece_bytes, size - i * piece_bytes), path, i) for i in range(count)]
    folders: List[Tuple[pathlib.Path, int]] = []
    for length, path, index in sorted(pieces, key=lambda piece: -piece[0]):
        slot = next((i for i, (_, used) in enumerate(folders) if not call_bytes or used + length <= call_bytes), None)
        if slot is None:
            slot = len(folders)
            folders.append((to / f"call{slot + 1:02d}" if call_bytes else to, 0))
        folder, used = folders[slot]
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as source:
            source.seek(index * piece_bytes)
            (folder / f"{path.name}.part{index:02d}").write_bytes(source.read(length))
        folders[slot] = (folder, used + length)
    return folders


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=pathlib.Path)
    parser.add_argument("--to", type=pathlib.Path, required=True, help="the folder the pieces go to")
    parser.add_argument("--piece-mb", type=float, default=28, help="MiB per piece at most (default 28)")
    parser.add_argument("--per-call-mb", type=float, default=0,
                        help="deal the pieces into call01/, call02/, ... of at most this many MiB each")
    args = parser.parse_args(argv)
    try:
        folders = split(args.files, args.to, int(args.piece_mb * MIB), int(args.per_call_mb * MIB))
    except (OSError, ValueError) as error:
        print(f"split_for_device: error: {error}", file=sys.stderr)
        return 2
    for folder, used in folders:
        print(f"{folder}  {used / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
