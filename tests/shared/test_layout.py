"""The package layout's dependency rules: shared layers below, one package per
workflow above, dependencies pointing down only."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "xclip"
WORKFLOWS = {"clip", "retrieval", "ood", "cir", "faithfulness", "distill"}
SHARED = {
    "backbones",
    "explain",
    "metrics",
    "data",
    "callbacks",
    "engine",
    "io",
    "results",
    "timing",
    "model_folder",
    "lazy_exports",
}
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
    assert layers <= WORKFLOWS | SHARED | TOP, (
        f"unclassified top-level entries: {sorted(layers - WORKFLOWS - SHARED - TOP)}"
    )
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


def _lightning_importers() -> list[str]:
    """Files (relative to the package) that import lightning."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level]
        if any(name == "lightning" or name.startswith(("lightning.", "pytorch_lightning")) for name in names):
            out.append(str(path.relative_to(SRC)))
    return out


def _is_wiring(rel: str) -> bool:
    """Lightning-wiring files: the engine, the generic callbacks and the suite, and in any package a
    ``*_module.py``, ``datamodule.py`` / ``*_datamodule.py`` or ``callback.py``."""
    name = rel.rsplit("/", 1)[-1]
    return (
        rel.startswith(("engine/", "callbacks/"))
        or rel == "suite.py"
        or name.endswith("_module.py")
        or name in ("datamodule.py", "callback.py")
        or name.endswith("_datamodule.py")
    )


def test_only_the_lightning_wiring_imports_lightning():
    importers = _lightning_importers()
    assert "engine/evaluation.py" in importers  # the checker sees real imports
    bad = [f for f in importers if not _is_wiring(f)]
    assert not bad, f"plain code importing lightning (move the math out, or name the file by its role): {bad}"


def _package_classes(base: type) -> list[type]:
    import importlib
    import inspect

    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        module = importlib.import_module(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        found += [
            c
            for _, c in inspect.getmembers(module, inspect.isclass)
            if issubclass(c, base) and c.__module__ == module.__name__
        ]
    return found


def test_every_lightning_module_derives_from_the_one_evaluation_base():
    import lightning.pytorch as pl

    from xclip.engine import EvaluationModule

    modules = _package_classes(pl.LightningModule)
    assert len(modules) >= 10, modules  # the checker finds the workflows' modules
    bad = [c.__qualname__ for c in modules if not issubclass(c, EvaluationModule)]
    assert not bad, f"LightningModules outside the evaluation contract (xclip.engine.EvaluationModule): {bad}"


def test_every_callback_writing_per_item_files_derives_from_the_stage_callback():
    import lightning.pytorch as pl

    from xclip.engine import StageCallback

    callbacks = _package_classes(pl.Callback)
    assert len(callbacks) >= 6, callbacks
    bad = [c.__qualname__ for c in callbacks if not issubclass(c, StageCallback)]
    assert not bad, f"callbacks outside xclip.engine.StageCallback: {bad}"


def test_every_export_goes_through_the_one_model_folder_format():
    from xclip.engine import ExportMixin

    writers = [
        str(p.relative_to(SRC))
        for p in sorted(SRC.rglob("*.py"))
        if "save_file"
        in {
            a.name
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.ImportFrom) and n.module == "safetensors.torch"
            for a in n.names
        }
    ]
    assert writers == ["model_folder.py"], writers
    import lightning.pytorch as pl

    exporters = [c for c in _package_classes(pl.LightningModule) if "export_model" in vars(c)]
    assert len(exporters) >= 4 and all(issubclass(c, ExportMixin) for c in exporters), exporters


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
