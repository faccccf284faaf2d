"""The ``xclip`` command: ``fit`` / ``validate`` / ``test`` run the LightningCLI of
`xclip.engine.lightning_cli` on YAML configs; commands that are not a Lightning loop (``xclip
cir-query``, ``vocab``, ``app``, ``annotations``) are listed in `COMMANDS` as ``"module:function"``
and imported only when called (each takes its argument list). ``xclip --help`` and the other
commands' ``--help`` print without importing torch.

Errors end the run with one paragraph, not a chained traceback: a config file that is not valid
YAML is named with the line of the problem; an error raised while building or running the
modules (a missing checkpoint, a corrupt weights file) is reported with xclip's own message, dug
out of the wrappers jsonargparse and Lightning put around it. ``--debug`` (or ``XCLIP_DEBUG=1``)
shows the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from pathlib import Path

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a recipe: xclip fit --config configs/<recipe>.yaml",
    "validate": "evaluate on validation data; writes results.json, TensorBoard logs, explanations",
    "test": "evaluate on held-out test data (same outputs)",
}
# name -> ("module:function(argv: list[str]) -> int | None", what it does), outside the Lightning loops
COMMANDS: dict[str, tuple[str, str]] = {
    "cir-query": ("xclip.cir.cli:main", "one composed query against your own image folder, with explanations"),
    "vocab": ("xclip.ood.cli:main", "build NegLabel's negative word lists (WordNet)"),
    "app": ("xclip.faithfulness.cli:main", "browse and score a TiPAI database in the browser"),
    "annotations": ("xclip.retrieval.cli:main", "merge filled failure-annotation sheets into a report"),
}
DEBUG_FLAG, DEBUG_ENV = "--debug", "XCLIP_DEBUG"


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE`` / ``--config=FILE`` (every occurrence)."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def check_config_files(argv: list[str]) -> None:
    """Raise `SystemExit` naming the file (and line) of a ``--config`` that is missing or not a
    YAML mapping, before jsonargparse reports it as ``<unicode string>`` under its usage text."""
    import yaml

    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"xclip: error: config file {name} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise SystemExit(f"xclip: error: config file {name} is not valid YAML{at}: {problem}") from None
        if data is not None and not isinstance(data, dict):
            raise SystemExit(
                f"xclip: error: config file {name} must hold a mapping (keys such as model:, data:, "
                f"trainer:), got a {type(data).__name__}"
            )


def _package_dir() -> Path:
    import xclip

    return Path(xclip.__file__).resolve().parent


def is_own_frame(filename: str, package_dir: Path | None = None) -> bool:
    """Whether a traceback frame's file belongs to the installed xclip package (not merely a path that
    contains a folder named ``xclip``: a clone named so holds its venv and every dependency)."""
    package_dir = package_dir or _package_dir()
    try:
        return Path(filename).resolve().is_relative_to(package_dir)
    except (OSError, ValueError):
        return False


def error_chain(error: BaseException) -> list[BaseException]:
    """The exceptions Python would print for ``error``, outermost first: the explicit ``__cause__``,
    else the implicit ``__context__`` unless the error was raised ``from None``."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        if current.__cause__ is not None:
            current = current.__cause__
        elif current.__suppress_context__:
            current = None
        else:
            current = current.__context__
    return chain


def root_cause(error: BaseException) -> BaseException:
    """The error a user can act on: the deepest exception of the chain Python would print that was
    raised by xclip's own code (else the deepest one)."""
    chain = error_chain(error)
    package_dir = _package_dir()
    for candidate in reversed(chain):
        frames = traceback.extract_tb(candidate.__traceback__)
        if frames and is_own_frame(frames[-1].filename, package_dir):
            return candidate
    return chain[-1]


def overview() -> str:
    """``xclip --help``: every command in one screen (no torch import)."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    rows = [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    others = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(
        [
            "usage: xclip <command> [options]",
            "",
            "xclip: evaluate, explain and fine-tune CLIP-family vision-language models.",
            "",
            "Lightning commands (YAML recipes in configs/):",
            *rows,
            "",
            "Other commands:",
            *others,
            "",
            "`xclip <command> --help` shows a command's options. Add --debug (or XCLIP_DEBUG=1) for the full traceback",
            "of an error.",
        ]
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``xclip`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != DEBUG_FLAG]
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        raise SystemExit(0 if argv else 2)
    try:
        if argv[0] in COMMANDS:
            module, _, function = COMMANDS[argv[0]][0].partition(":")
            code = getattr(importlib.import_module(module), function)(argv[1:])
            if code:
                raise SystemExit(code)
            return
        if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
            raise SystemExit(
                f"xclip: error: unknown command {argv[0]!r}: choose from "
                f"{', '.join([*LIGHTNING_COMMANDS, *COMMANDS])} (xclip --help)"
            )
        check_config_files(argv)
        from xclip.engine.lightning_cli import XClipCLI, quiet_lightning

        quiet_lightning()
        others = ", ".join(f"xclip {name} --help" for name in COMMANDS)
        XClipCLI(
            save_config_kwargs={"overwrite": True},
            args=argv,
            parser_kwargs={
                "default_env": False,
                "description": "xclip: evaluate, explain and fine-tune CLIP-family models "
                "(xclip fit|validate|test --config configs/<recipe>.yaml).",
                "epilog": f"Other commands: {others}. Add {DEBUG_FLAG} (or {DEBUG_ENV}=1) for "
                "the full traceback of an error.",
            },
        )
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:
        if debug:
            raise
        cause = root_cause(err)
        raise SystemExit(
            f"xclip: error: {type(cause).__name__}: {cause}\n"
            f"(run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the full traceback)"
        ) from None


if __name__ == "__main__":
    main()
