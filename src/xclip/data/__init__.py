"""Datasets: ShapesWorld (embedded), caption galleries and loaders for the real formats."""

from xclip.data.combined import CombinedDataModule
from xclip.data.coco import AnnotationError, load_coco_captions, load_karpathy
from xclip.data.embedding_cache import EmbeddingCache, GalleryEmbeddings
from xclip.data.gallery import CaptionGallery, FileGallery, ShapesGallery
from xclip.data.image_folder import ImageFolder
from xclip.data.ood import OODDataModule
from xclip.data.retrieval import RetrievalDataModule
from xclip.data.shapes import ShapesWorldDataModule
from xclip.data.waterbirds import WaterBirds

__all__ = [
    "AnnotationError", "CaptionGallery", "CombinedDataModule", "EmbeddingCache", "FileGallery", "GalleryEmbeddings", "ImageFolder",
    "OODDataModule", "RetrievalDataModule", "ShapesGallery", "ShapesWorldDataModule", "WaterBirds",
    "load_coco_captions", "load_karpathy",
]
