"""What ``xclip cir-query`` runs (`xclip.cir.cli` parses its arguments): one composed query against
a folder of images, with explanations.

The gallery folder is embedded once and cached (`--cache-dir`, default ``~/.cache/xclip/cir``,
keyed by the model, its weights, the image size and every file's name, size and modification
time); ``--gallery`` may also name a cache entry directly (the folder holding ``meta.json`` and
``embeddings.safetensors``). The reference is removed from the ranking when it is one of the
gallery's files (as CIRR does). Writes ``<out>/results.json`` (ranks, scores, files, skipped
files) and, with ``--explain``, maps A-D under ``<out>/explanation/`` (see `xclip.cir.report`);
without ``--out`` a new ``runs/cir_query/version_N/``. Unreadable gallery files (corrupt, or
declaring more pixels than `xclip.data.images.MAX_PIXELS`) are skipped, counted and named; a
gallery with nothing to rank besides the reference is an error (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from xclip.backbones import load_backbone
from xclip.cir.cli import DEFAULT_OUT
from xclip.cir.explain import CIRExplainer
from xclip.cir.phi import check_compatible, load_phi
from xclip.cir.query import compose_query, query_features
from xclip.cir.report import write_query_explanation
from xclip.data.embedding_cache import (
    META_NAME,
    EmbeddingCache,
    GalleryEmbeddings,
    weights_fingerprint,
)
from xclip.data.image_folder import ImageFolder, collate_skipping
from xclip.data.images import ImageReadError, read_rgb, resize_center_crop
from xclip.io import atomic_write_text
from xclip.metrics.cir import rank_gallery


def new_run_folder(root: Path) -> Path:
    """``root/version_N`` with N one more than the highest existing (created here)."""
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name.split("_", 1)[1]) for p in root.glob("version_*") if p.name.split("_", 1)[1].isdigit()]
    n = max(taken, default=-1) + 1
    while True:  # another run may take the same number first
        try:
            (root / f"version_{n}").mkdir()
            return root / f"version_{n}"
        except FileExistsError:
            n += 1


def _folder_key(backbone, spec: str, root: Path, files: list[Path], image_size: int) -> dict:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return {
        "kind": "cir-folder",
        "backbone": spec,
        "weights_sha256": weights_fingerprint(backbone),
        "preprocess": backbone.preprocess_cfg.to_dict(),
        "image_size": image_size,
        "root": str(root.resolve()),
        "files_sha256": h.hexdigest(),
    }


def gallery_embeddings(
    backbone, spec: str, gallery: Path, image_size: int, cache_root: Path, batch_size: int
) -> tuple[list[str], torch.Tensor, list[str], str]:
    """(file paths, L2-normalised embeddings [N, D], skipped files, cache status) of a folder or a cache entry."""
    if (gallery / META_NAME).is_file():
        meta = json.loads((gallery / META_NAME).read_text())
        cache = EmbeddingCache(gallery.parent, meta.get("key", {}))
        if cache.dir.resolve() != gallery.resolve():
            raise ValueError(f"{gallery}: not an xclip cache entry (its key does not hash to this folder)")
        if meta["key"].get("weights_sha256") != weights_fingerprint(backbone):
            raise ValueError(
                f"{gallery} was embedded with other weights ({meta['key'].get('backbone')}): "
                f"pass --backbone {meta['key'].get('backbone')}"
            )
        emb = cache.load(meta["image_keys"], [])
        if emb is None:
            raise ValueError(
                f"{gallery}: the cache entry is unusable ({cache.status}); point --gallery at the image folder"
            )
        return list(meta["image_keys"]), emb.image_emb, list(meta.get("skipped", [])), "hit"
    folder = ImageFolder(gallery, image_size)
    cache = EmbeddingCache(cache_root, _folder_key(backbone, spec, gallery, folder.files, image_size))
    keys = [str(f.resolve()) for f in folder.files]
    cached = cache.load(keys, [])
    if cached is not None:
        kept = cached.image_index.tolist()
        return [keys[i] for i in kept], cached.image_emb, [], "hit"
    loader = DataLoader(folder, batch_size=batch_size, collate_fn=collate_skipping)
    embs: list[torch.Tensor] = []
    indexes: list[torch.Tensor] = []
    skipped: list[str] = []
    with torch.no_grad():
        for batch in loader:
            skipped.extend(str((gallery / p).resolve()) for p in batch["skipped_paths"])
            if "image" in batch:
                images = backbone.normalize(batch["image"].to(backbone.device))
                embs.append(backbone.encode_image(images, normalize=True).float().cpu())
                indexes.append(batch["index"])
    if not embs:
        raise ValueError(
            f"no image in {gallery} could be read ({len(skipped)} unreadable files, e.g. "
            f"{', '.join(skipped[:3])}): point --gallery at a folder of images"
        )
    image_emb, index = torch.cat(embs), torch.cat(indexes)
    if not skipped:  # only complete galleries are cached (the cache checks rows against its keys)
        no_text_emb, no_text_owner = torch.zeros(0, image_emb.shape[1]), torch.zeros(0, dtype=torch.long)
        cache.save(GalleryEmbeddings(image_emb, no_text_emb, no_text_owner, index), keys, [])
    return [keys[int(i)] for i in index], image_emb, skipped, cache.status


def run_query(args: argparse.Namespace) -> int:
    """Rank the gallery for one composed query (the parsed arguments of ``xclip cir-query``), write
    results.json and, with ``--explain``, explanations A-D; returns the exit status."""
    reference, gallery = Path(args.reference), Path(args.gallery)
    try:
        backbone = load_backbone(args.backbone, device=args.device).requires_grad_(False)
        phi = load_phi(args.phi).to(backbone.device)
        check_compatible(phi, backbone)
        size = args.image_size or backbone.image_size
        ref01 = resize_center_crop(read_rgb(reference), size)
        cache_root = Path(args.cache_dir) if args.cache_dir else Path(os.path.expanduser("~/.cache/xclip/cir"))
        files, emb, skipped, status = gallery_embeddings(
            backbone, args.backbone, gallery, size, cache_root, args.batch_size
        )
    except (OSError, ValueError, ImageReadError) as err:
        print(f"xclip cir-query: {err}", file=sys.stderr)
        return 1
    with torch.no_grad():
        feats = backbone.encode_image(backbone.normalize(ref01[None].to(backbone.device))).float()
        q = query_features(backbone, phi(feats), [[args.caption]]).cpu()
    nan_rows = (~torch.isfinite(emb).all(1)).nonzero().flatten().tolist()
    if nan_rows or not bool(torch.isfinite(q).all()):
        what = (
            f"{len(nan_rows)} gallery images, e.g. {', '.join(files[i] for i in nan_rows[:3])}"
            if nan_rows
            else f"the query (reference {reference})"
        )
        print(
            f"xclip cir-query: the model gave NaN or infinite embeddings for {what}: check --backbone, --phi "
            "and these files",
            file=sys.stderr,
        )
        return 1
    ref_path = str(reference.resolve())
    ranked = rank_gallery(q, emb, top=args.top_k + 1)[0].tolist()
    ranked = [i for i in ranked if files[i] != ref_path][: args.top_k]
    if not ranked:
        print(
            f"xclip cir-query: the gallery {gallery} holds no image besides the reference {reference}"
            f"{f' ({len(skipped)} unreadable files skipped)' if skipped else ''}: add images to rank to the folder "
            "(or pass another --gallery)",
            file=sys.stderr,
        )
        return 1
    note = None
    if len(ranked) < args.top_k:
        note = (
            f"--top-k {args.top_k}: the gallery holds {len(ranked)} image{'s' if len(ranked) > 1 else ''} besides "
            f"the reference, so {len(ranked)} {'are' if len(ranked) > 1 else 'is'} returned"
        )
    scores = (F.normalize(emb[ranked], dim=-1) @ q[0]).tolist()
    out = Path(args.out) if args.out else new_run_folder(DEFAULT_OUT)
    results = {
        "reference": ref_path,
        "caption": args.caption,
        "prompt": compose_query(args.caption),
        "backbone": args.backbone,
        "phi": args.phi,
        "gallery": str(gallery.resolve()),
        "gallery_size": len(files),
        "gallery_cache": status,
        "skipped": skipped,
        "top_k": args.top_k,
        "note": note,
        "results": [{"rank": r + 1, "file": files[i], "score": s} for r, (i, s) in enumerate(zip(ranked, scores))],
    }
    if args.explain:
        cands = torch.stack([resize_center_crop(read_rgb(files[i]), size) for i in ranked])
        ex = CIRExplainer(backbone, phi).explain(
            backbone.normalize(ref01[None].to(backbone.device)),
            args.caption,
            backbone.normalize(cands.to(backbone.device)),
        )
        entry, _ = write_query_explanation(
            out,
            "explanation",
            args.caption,
            ref01,
            ref_path,
            cands,
            [files[i] for i in ranked],
            list(range(1, len(ranked) + 1)),
            ex,
        )
        results["explanation"] = entry["folder"]
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    print(f"{results['prompt']}  (gallery: {len(files)} images, cache {status})")
    for row in results["results"]:
        print(f"{row['rank']:>4}  {row['score']:.4f}  {row['file']}")
    if note:
        print(f"note: {note}")
    if skipped:
        print(
            f"skipped {len(skipped)} unreadable file{'s' if len(skipped) > 1 else ''}: {', '.join(skipped[:5])}"
            f"{' ...' if len(skipped) > 5 else ''} (listed in results.json)"
        )
    print(f"results: {out / 'results.json'}" + (f"; explanations: {results['explanation']}" if args.explain else ""))
    return 0
