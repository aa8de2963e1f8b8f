"""One cache keyed by live tensors, for everything derived from tensors that is worth keeping.

Used by :class:`sparsefast.backends.base.Backend` (per backend: packed formats, mask-derived index
structures, the forward-to-backward hand-off) and by :mod:`sparsefast.formats.kept` (the kept-values
index of each mask). An entry is ``(tag, tensors) -> value`` and is valid while every one of its tensors
is alive and unmodified:

* the key holds *weak* references, so a freed tensor whose memory is reused can never produce a stale
  hit, and a finalizer drops the entry (a packed copy may be large) as soon as one of its tensors dies;
* it records each tensor's version counter, data pointer, shape, dtype and device, so an in-place change
  (an optimizer step, ``set_mask``, ``copy_``) or a re-pointed ``.data`` invalidates it.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Sequence

import torch

__all__ = ["TensorCache"]


def _stamp(tensors: Sequence[torch.Tensor], extra: Any = None) -> tuple:
    """What an entry is valid for: each tensor's contents (version counter) at its storage, shape, dtype
    and device, plus the caller's ``extra``. (Asked on every kernel call: one tensor, the common case,
    without a generator.)"""
    if len(tensors) == 1:
        t = tensors[0]
        return (t._version, t.data_ptr(), t.shape, t.dtype, t.device), extra
    return tuple((t._version, t.data_ptr(), t.shape, t.dtype, t.device) for t in tensors), extra


def _same(refs: tuple, tensors: Sequence[torch.Tensor]) -> bool:
    """Every weak reference still points at its tensor (not a dead one's reused id)."""
    for r, t in zip(refs, tensors):
        if r() is not t:
            return False
    return True


class TensorCache:
    """``(tag, tensors) -> value`` entries, valid while the tensors are alive and unmodified (module
    docstring). Thread-safe; finalizers never wait for the lock (a tensor can die inside a locked
    section of the same thread: its key is then dropped by the next store or finalizer)."""

    #: above this many entries a store first drops the entries whose tensors are gone
    PRUNE_AT = 256

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}     # key -> (weak refs, stamp, value)
        self._watched: dict[tuple, tuple] = {}   # key -> weak refs of the tensors its finalizers watch
        self._dead: list[tuple] = []             # keys whose tensors died while the lock was held
        self._lock = threading.Lock()

    @staticmethod
    def _key(tag: str, tensors: Sequence[torch.Tensor]) -> tuple:
        return (tag, id(tensors[0])) if len(tensors) == 1 else (tag, *map(id, tensors))

    def get(self, tag: str, tensors: Sequence[torch.Tensor], extra: Any = None) -> Any:
        """The value stored for ``(tag, tensors)`` if it is still valid (same ``extra``), else ``None``."""
        hit = self._cache.get(self._key(tag, tensors))  # (one dict read: atomic, no lock needed)
        if hit is None or not _same(hit[0], tensors):
            return None
        return hit[2] if hit[1] == _stamp(tensors, extra) else None

    def cached(self, tag: str, tensors: Sequence[torch.Tensor], build: Callable[[], Any], extra: Any = None) -> Any:
        """The valid value for ``(tag, tensors)``, else ``build()`` stored and returned."""
        hit = self.get(tag, tensors, extra)
        if hit is not None:
            return hit
        value = build()
        self.put(tag, tensors, value, extra)
        return value

    def put(self, tag: str, tensors: Sequence[torch.Tensor], value: Any, extra: Any = None) -> None:
        """Store ``value`` for ``(tag, tensors)`` as they are now (replacing any earlier entry)."""
        key = self._key(tag, tensors)
        stamp = _stamp(tensors, extra)
        refs = tuple(weakref.ref(t) for t in tensors)
        with self._lock:
            if len(self._cache) > self.PRUNE_AT or self._dead:  # drop entries whose tensors are gone
                self._dead.clear()
                self._cache = {k: e for k, e in self._cache.items() if all(r() is not None for r in e[0])}
                self._watched = {k: w for k, w in self._watched.items() if all(r() is not None for r in w)}
            self._cache[key] = (refs, stamp, value)
            w = self._watched.get(key)
            fresh = w is None or not _same(w, tensors)  # (a take keeps the finalizers)
            if fresh:
                self._watched[key] = refs
        if fresh:
            for t in tensors:
                weakref.finalize(t, self._drop_dead, key)

    def take(self, tag: str, tensors: Sequence[torch.Tensor]) -> Any:
        """The value stored for ``(tag, tensors)``, removed; ``None`` when there is none, or the tensors
        changed in place or were freed since (a forward's hand-off to its own backward)."""
        key = self._key(tag, tensors)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None or not _same(hit[0], tensors):
                return None
            del self._cache[key]
        return hit[2] if hit[1] == _stamp(tensors) else None

    def drop(self, tag: str, tensors: Sequence[torch.Tensor]) -> None:
        """Forget the entry for ``(tag, tensors)`` (rebuilt by the next :meth:`cached`)."""
        key = self._key(tag, tensors)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and _same(hit[0], tensors):
                del self._cache[key]

    def holds(self, tag: str, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether an entry for ``(tag, tensors)`` is held at all, valid or not (tests: memory released)."""
        hit = self._cache.get(self._key(tag, tensors))
        return hit is not None and _same(hit[0], tensors)

    def tags(self) -> list[str]:
        """The tags of the entries held (one per entry)."""
        with self._lock:
            return [k[0] for k in self._cache]

    def entries(self, tag: str) -> list[tuple]:
        """The weak references of the tensors of each entry held with ``tag`` (tests: what is kept)."""
        with self._lock:
            return [e[0] for k, e in self._cache.items() if k[0] == tag]

    def watched(self, tag: str) -> list[tuple]:
        """The weak references of the tensors watched for entries with ``tag`` (tests: finalizers)."""
        with self._lock:
            return [w for k, w in self._watched.items() if k[0] == tag]

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def _drop_dead(self, key: tuple) -> None:
        """Finalizer of an entry's tensor. It can run inside a locked section of this thread (a tensor
        freed there), so it never waits for the lock: then the key is dropped later."""
        if not self._lock.acquire(blocking=False):
            self._dead.append(key)
            return
        try:
            for k in (key, *self._dead):
                hit = self._cache.get(k)
                if hit is not None and any(r() is None for r in hit[0]):
                    del self._cache[k]
                w = self._watched.get(k)
                if w is not None and any(r() is None for r in w):
                    del self._watched[k]
            self._dead.clear()
        finally:
            self._lock.release()
