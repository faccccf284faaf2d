"""Data shared by every workflow: ShapesWorld (embedded), image folders, the embedding cache and
`CombinedDataModule` (several workflows' loaders in one run). Workflow-specific loaders live in
their workflow package (``xclip.retrieval``, ``xclip.ood``, ...)."""

from xclip.data.combined_datamodule import CombinedDataModule
from xclip.data.embedding_cache import EmbeddingCache, GalleryEmbeddings
from xclip.data.image_folder import ImageFolder
from xclip.data.shapes import ShapesWorldDataModule

__all__ = ["CombinedDataModule", "EmbeddingCache", "GalleryEmbeddings", "ImageFolder", "ShapesWorldDataModule"]
