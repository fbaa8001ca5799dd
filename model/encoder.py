"""Batched window encoding for the engine: the ViT over the views of many pages at once, the feature cache, and the
pages staged ahead of admission (interleaved ViT).

Legend: V views, N tokens per view, M media tokens of a page (V*N), Dv visual width.

A page's media (ViT features with the window encoding added) is looked up by `PageViews.cache_key`: staged (encoded a
step or more ago for a waiting request), in the feature cache, or encoded now with every other page of the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .cache import FeatureCache
from .config import EngineConfig
from .infimm import InfiMMHD
from .requests import EncodedImage, EngineObserver, Seq
from .windows import PageViews, normalize_views


class PageEncoder:
    """Holds no reference to the engine: the waiting requests are passed in where they matter."""

    def __init__(self, model: InfiMMHD, config: EngineConfig, observer: EngineObserver, device, dtype):
        self.model, self.config, self.observer = model, config, observer
        self.device, self.dtype = device, dtype
        self.features = FeatureCache(config.feature_cache_mb * 2**20)
        self.staged: dict[str, list] = {}  # interleaved ViT: key -> [features (M, Dv), encode seconds, charged]

    def ready(self, seq: Seq) -> bool:
        """Every page of the request is encoded (staged, cached or given as features)."""
        return all(k is None or k in self.staged or k in self.features for k in seq.page_keys())

    def encode_ahead(self, upcoming: list[Seq]) -> None:
        """Interleaved ViT: encode up to `vit_step_views` views (whole pages, at least one) of the pages that the next
        requests to get a free slot need; the running slots decode after this chunk instead of after all of them."""
        todo: dict[str, PageViews] = {}
        views = 0
        for seq in upcoming:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None or key in todo or key in self.staged or key in self.features:
                    continue
                if todo and views + page.n_views > self.config.vit_step_views:
                    break
                todo[key] = page
                views += page.n_views
        if todo:
            encoded, seconds = self.run_vit(todo)
            for key, feats in encoded.items():
                self.staged[key] = [feats, seconds, False]

    def run_vit(self, todo: dict[str, PageViews]) -> tuple[dict[str, torch.Tensor], float]:
        """ViT over the views of these pages, all pages together in chunks of `vit_batch_views` -> media per page."""
        t0 = time.perf_counter()
        encoded: dict[str, torch.Tensor] = {}
        pages = iter(todo.items())
        views = torch.cat([p.views for p in todo.values()])  # (sum V, 3, 448, 448) uint8, still on the host
        key, page = next(pages)
        parts: list[torch.Tensor] = []
        for chunk in views.split(self.config.vit_batch_views):
            x = normalize_views(chunk.to(self.device, non_blocking=True), self.dtype)
            feats = self.model.encode_views(x)  # (v, N, Dv)
            while feats.shape[0]:  # hand the chunk's views to their pages; a page may span chunks
                take = page.n_views - sum(t.shape[0] for t in parts)
                parts.append(feats[:take])
                feats = feats[take:]
                if sum(t.shape[0] for t in parts) == page.n_views:  # page complete: its media, then free views
                    encoded[key] = self.model.build_media(torch.cat(parts), page.rows, page.cols)  # (V*N, Dv)
                    self.features.put(key, encoded[key])
                    parts = []
                    key, page = next(pages, (None, None))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.observer.on_encode(views.shape[0], seconds)
        return encoded, seconds

    def encode(self, seqs: list[Seq], waiting: Callable[[], list[Seq]]) -> None:
        """Media of these admitted requests (into `seq.media`): staged, cached, or encoded now, all pages together.
        Staged pages are kept only while a request still `waiting()` needs them."""
        todo: dict[str, PageViews] = {}
        cached: dict[str, torch.Tensor] = {}  # held here: encoding `todo` may evict them from the cache
        for seq in seqs:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None or key in self.staged or key in todo or key in cached:
                    continue
                feats = self.features.get(key)
                if feats is None:
                    todo[key] = page
                else:
                    cached[key] = feats
        encoded, seconds = self.run_vit(todo) if todo else ({}, 0.0)
        charged: set[str] = set()
        for seq in seqs:
            for page, key in zip(seq.request.images, seq.page_keys(), strict=True):
                if key is None:
                    assert isinstance(page, EncodedImage), "only given features have no cache key"
                    seq.media.append(page.features.to(self.device, self.dtype))
                    continue
                staged = self.staged.get(key)
                if staged is not None and not staged[2]:  # encoded a step or more ago for this request
                    staged[2] = True
                    seq.timings.encode_s = staged[1]
                    self.features.misses += 1
                elif key in encoded and key not in charged:  # the first request asking for a page pays its encode
                    charged.add(key)
                    seq.timings.encode_s = seconds
                    self.features.misses += 1
                else:  # shared: encoded for another request, or a feature-cache hit
                    seq.cached_images += 1
                    self.features.hits += 1
                if staged is not None:
                    seq.media.append(staged[0])
                else:
                    seq.media.append(encoded[key] if key in encoded else cached[key])
        if self.staged:  # keep staged pages only while a waiting request still needs them
            needed = {k for s in waiting() for k in s.page_keys()}
            for key in [k for k in self.staged if k not in needed]:
                del self.staged[key]

    def close(self) -> None:
        self.features = FeatureCache(0)
        self.staged.clear()
