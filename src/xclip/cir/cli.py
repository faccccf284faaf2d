"""``xclip cir-query``: one composed query against your own image folder, with explanations.

    xclip cir-query --reference ref.png --caption "is blue instead of red" --gallery photos/ \
        --top-k 10 --explain [--out results/]

This module only parses and checks the arguments (``--help`` imports no torch); the work is
`xclip.cir.folder_query.run_query` (gallery cache, ranking, results.json, explanations A-D).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = "is blue instead of red"
DEFAULT_OUT = Path("runs") / "cir_query"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xclip cir-query", description="Composed image retrieval (SEARLE) on an image folder."
    )
    p.add_argument("--reference", required=True, help="the reference image file")
    p.add_argument("--caption", required=True, help=f'the relative caption, e.g. "{EXAMPLE}"')
    p.add_argument("--gallery", required=True, help="an image folder, or a cache entry written by an earlier run")
    p.add_argument("--top-k", type=int, default=10, help="candidates to return (default 10)")
    p.add_argument("--explain", action="store_true", help="write explanations A-D for the top-k candidates")
    p.add_argument("--out", default=None, help=f"output folder (default: a new {DEFAULT_OUT}/version_N)")
    p.add_argument("--backbone", default="xclip:tiny-shapes", help="backbone spec (default xclip:tiny-shapes)")
    p.add_argument(
        "--phi",
        default="xclip:searle-phi-tiny-shapes",
        help="phi: xclip:<name>, searle:ViT-B/32, a directory or a SEARLE .pt (default xclip:searle-phi-tiny-shapes)",
    )
    p.add_argument("--image-size", type=int, default=None, help="image side (default: the backbone's input size)")
    p.add_argument("--cache-dir", default=None, help="gallery cache root (default ~/.cache/xclip/cir)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """``xclip cir-query``; returns the exit status."""
    args = _parser().parse_args(argv)
    gallery = Path(args.gallery)
    if args.top_k < 1:
        print("xclip cir-query: --top-k must be >= 1", file=sys.stderr)
        return 2
    if not args.caption.strip():
        print(
            f"xclip cir-query: --caption is empty: pass the change to make to the reference, e.g. --caption "
            f'"{EXAMPLE}"',
            file=sys.stderr,
        )
        return 2
    if not gallery.is_dir():
        print(f"xclip cir-query: --gallery {gallery} is not a folder", file=sys.stderr)
        return 2
    from xclip.cir.folder_query import run_query

    return run_query(args)
