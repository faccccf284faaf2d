"""Composed image retrieval with SEARLE (phi, OTI) and its four explanations.

Plain math (no Lightning): `phi` (the network, SEARLE's released state dicts, xclip's format),
`query` (prompts, pseudo-token encoding, FashionIQ's combination), `oti` (batched textual
inversion), `losses`, `concepts` (ShapesWorld concepts and phrases), `explain` (A-D batched over
candidates), `benchmark` / `loaders` (ShapesWorld, CIRR, CIRCO, FashionIQ), `scoring`.
Lightning: `CIRDataModule`, `CIRModule` (eval), `PhiTrainingModule` (fit), `CIRExplanationCallback`.
Command: ``xclip cir-query`` (`query_cli`).
"""

from xclip.cir.benchmark import (
           CIRBenchmark,
           CIRQuery,
           FileCIRBenchmark,
           ShapesCIRBenchmark,
)
from xclip.cir.callback import CIRExplanationCallback
from xclip.cir.cir_module import CIRModule
from xclip.cir.datamodule import CIRDataModule
from xclip.cir.explain import CIRExplainer, CIRExplanation
from xclip.cir.loaders import CIRAnnotationError, load_circo, load_cirr, load_fashioniq
from xclip.cir.oti import OTIConfig, oti_invert
from xclip.cir.phi import Phi, load_phi, load_searle_phi
from xclip.cir.phi_module import PhiTrainingModule
from xclip.cir.query import (
           compose_query,
           encode_with_pseudo_tokens,
           fashioniq_queries,
           query_features,
)

__all__ = ["CIRAnnotationError", "CIRBenchmark", "CIRDataModule", "CIRExplainer", "CIRExplanation",
           "CIRExplanationCallback", "CIRModule", "CIRQuery", "FileCIRBenchmark", "OTIConfig", "Phi",
           "PhiTrainingModule", "ShapesCIRBenchmark", "compose_query", "encode_with_pseudo_tokens", "fashioniq_queries",
           "load_circo", "load_cirr", "load_fashioniq", "load_phi", "load_searle_phi", "oti_invert", "query_features"]
