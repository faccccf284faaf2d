"""Composed image retrieval with SEARLE (phi, OTI) and its four explanations.

Plain math (no Lightning): `phi` (the network, SEARLE's released state dicts, xclip's format),
`query` (prompts, pseudo-token encoding, FashionIQ's combination), `oti` (batched textual
inversion), `losses`, `concepts` (ShapesWorld concepts and phrases), `explain` (A-D batched over
candidates), `benchmark` / `loaders` (ShapesWorld, CIRR, CIRCO, FashionIQ), `scoring`.
Lightning: `CIRDataModule`, `CIRModule` (eval), `PhiTrainingModule` (fit), `CIRExplanationCallback`.
Command: ``xclip cir-query`` (`cli` parses, `folder_query` runs).
"""

from xclip.lazy_exports import lazy_exports

_EXPORTS = {
    "CIRAnnotationError": ".loaders",
    "CIRBenchmark": ".benchmark",
    "CIRDataModule": ".datamodule",
    "CIRExplainer": ".explain",
    "CIRExplanation": ".explain",
    "CIRExplanationCallback": ".callback",
    "CIRModule": ".cir_module",
    "CIRQuery": ".benchmark",
    "FileCIRBenchmark": ".benchmark",
    "OTIConfig": ".oti",
    "Phi": ".phi",
    "PhiTrainingModule": ".phi_module",
    "ShapesCIRBenchmark": ".benchmark",
    "compose_query": ".query",
    "encode_with_pseudo_tokens": ".query",
    "fashioniq_queries": ".query",
    "load_circo": ".loaders",
    "load_cirr": ".loaders",
    "load_fashioniq": ".loaders",
    "load_phi": ".phi",
    "load_searle_phi": ".phi",
    "oti_invert": ".oti",
    "query_features": ".query",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
