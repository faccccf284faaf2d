"""The package layout's dependency rules: shared layers below, one package per
workflow above, dependencies pointing down only."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "xclip"
WORKFLOWS = {"clip", "retrieval", "ood", "cir", "faithfulness", "distill"}
SHARED = {"backbones", "explain", "metrics", "data", "callbacks", "io", "results", "timing"}
TOP = {"suite", "cli"}


def _imports(path: Path) -> set[str]:
    """Every ``xclip.*`` module a file imports (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("xclip"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("xclip"):
                out.add(node.module)
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges() -> list[tuple[str, str, str]]:
    """(file, its layer, imported module) for every xclip import in the package."""
    edges = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        layer = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else ""
        edges.extend((str(rel), layer, mod) for mod in _imports(path))
    return edges


def test_every_layer_is_known():
    layers = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.name != "__pycache__" and p.name != "__init__.py"}
    assert layers <= WORKFLOWS | SHARED | TOP, f"unclassified top-level entries: {sorted(layers - WORKFLOWS - SHARED - TOP)}"
    assert not {"models", "modules", "analysis", "utils"} & layers, "catch-all packages are gone"


def test_nothing_imports_the_entry_point():
    bad = [(f, m) for f, _, m in _edges() if m == "xclip.cli" or m.startswith("xclip.cli.")]
    assert not bad, f"imports of the CLI entry point: {bad}"


def test_shared_layers_never_import_a_workflow_or_the_top():
    bad = [(f, m) for f, layer, m in _edges() if layer in SHARED and _layer(m) in WORKFLOWS | TOP]
    assert not bad, f"shared layers importing upwards: {bad}"


def test_workflows_never_import_another_workflow():
    bad = [(f, m) for f, layer, m in _edges() if layer in WORKFLOWS and _layer(m) in WORKFLOWS and _layer(m) != layer]
    assert not bad, f"cross-workflow imports: {bad}"
    bad = [(f, m) for f, layer, m in _edges() if layer in WORKFLOWS and _layer(m) in TOP]
    assert not bad, f"workflows importing the suite or CLI: {bad}"


def test_the_checker_sees_real_edges():
    # guard against a checker that passes because it finds nothing
    edges = _edges()
    assert ("ood/negalign_module.py", "ood", "xclip.results") in edges
    assert any(f == "retrieval/retrieval_module.py" and m == "xclip.metrics.retrieval" for f, _, m in edges)
    assert "xclip.backbones.base" in _imports(SRC / "backbones" / "__init__.py")


def test_config_class_paths_resolve():
    import importlib

    import yaml

    def class_paths(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "class_path":
                    yield v
                else:
                    yield from class_paths(v)
        elif isinstance(node, list):
            for v in node:
                yield from class_paths(v)

    configs = sorted((SRC.parents[1] / "configs").glob("*.yaml"))
    assert configs
    for cfg in configs:
        for path in class_paths(yaml.safe_load(cfg.read_text())):
            module, _, name = path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), f"{cfg.name}: {path} does not resolve"
