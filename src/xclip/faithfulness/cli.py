"""``xclip app --db PATH [--head DIR] [--backbone SPEC] [--host H] [--port P]``: browse a TiPAI
database in a local web app (Gradio). This module parses the arguments (``--help`` imports neither
torch nor Gradio); the app is `xclip.faithfulness.app`."""

from __future__ import annotations

import argparse
import importlib.util
import os


def main(argv: list[str]) -> int:
    """``xclip app``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="xclip app", description="Browse a TiPAI database in a local web app (Gradio)."
    )
    parser.add_argument("--db", required=True, help="the TiPAI database (tipai.db of a TiPAI run)")
    parser.add_argument(
        "--head", default=None, help="an exported TSPO head directory (e.g. checkpoints/tspo-head-tiny-shapes)"
    )
    parser.add_argument("--backbone", default=None, help="backbone spec for scoring uploads (default: the database's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if importlib.util.find_spec("gradio") is None:
        print('xclip app needs Gradio: pip install "xclip[app]"')
        return 2
    from xclip.faithfulness.app import serve

    return serve(args)
