"""The one tensor-keyed cache (sparsefast._tensor_cache): backends' formats and hand-offs and the
kept-values index live in it, so its validity rules are tested once here."""
import gc
import threading

import torch

from sparsefast._tensor_cache import TensorCache
from sparsefast.formats import kept


def test_entry_valid_while_tensors_alive_and_unmodified():
    tc = TensorCache()
    a, b = torch.randn(4), torch.zeros(3, dtype=torch.bool)
    built = []
    first = tc.cached("t", (a, b), lambda: built.append(1) or "v1")
    assert first == "v1" and tc.cached("t", (a, b), lambda: "other") == "v1" and built == [1]
    assert tc.get("t", (b, a)) is None and tc.get("u", (a, b)) is None  # key: tag and tensor order
    assert tc.get("t", (a, b), extra="x") is None  # extra is part of what it is valid for
    a.add_(1)  # in-place change: stale
    assert tc.get("t", (a, b)) is None
    assert tc.cached("t", (a, b), lambda: "v2") == "v2" and len(tc) == 1  # replaced, not added
    a.data = torch.randn(4)  # same tensor object, new storage: stale (data pointer)
    assert tc.get("t", (a, b)) is None


def test_entry_dropped_when_a_tensor_dies_and_no_stale_hit_on_reused_id():
    tc = TensorCache()
    a, b = torch.randn(4), torch.randn(4)
    tc.put("t", (a, b), "v")
    assert tc.holds("t", (a, b))
    del a  # no gc.collect() needed: the finalizer runs when the last reference goes
    assert len(tc) == 0 and tc.watched("t") == []
    for _ in range(50):  # a new tensor may get the dead one's id: never a hit
        c = torch.randn(4)
        assert tc.get("t", (c, b)) is None
        del c


def test_take_and_drop():
    tc = TensorCache()
    a = torch.randn(2)
    tc.put("h", (a,), "w")
    assert tc.take("h", (a,)) == "w" and tc.take("h", (a,)) is None
    tc.put("h", (a,), "w")
    a.mul_(2)
    assert tc.take("h", (a,)) is None and not tc.holds("h", (a,))  # stale: removed, nothing returned
    tc.put("i", (a,), "x")
    tc.drop("i", (a,))
    assert tc.get("i", (a,)) is None and not tc.holds("i", (a,))
    tc.drop("i", (a,))  # dropping nothing is fine


def test_one_finalizer_per_entry_across_repeated_stores():
    tc = TensorCache()
    a = torch.randn(3)
    for i in range(20):  # a forward's hand-off every step: one watched registration, not twenty
        tc.put("h", (a,), i)
        assert tc.take("h", (a,)) == i
    assert len(tc.watched("h")) == 1


def test_threads_share_one_cache():
    tc = TensorCache()
    ts = [torch.randn(5) for _ in range(8)]
    out = {}

    def work(i):
        for _ in range(200):
            out[i] = tc.cached("t", (ts[i],), lambda: i * 10)

    th = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    assert out == {i: i * 10 for i in range(8)} and len(tc) == 8


def test_kept_index_uses_it():
    mask = torch.rand(6, 8) < 0.5
    flat = kept.index(mask)
    assert kept.cached_index(mask) is flat and kept._INDEX.holds("index", (mask,))
    other = mask.clone()
    kept.share_index(mask, other)
    assert kept.cached_index(other) is flat
    kept.release(other)
    assert kept.cached_index(other) is None and kept.cached_index(mask) is flat
    mask[0, 0] = not bool(mask[0, 0])  # a changed mask: a new index, matching its contents
    assert kept.cached_index(mask) is None
    assert torch.equal(kept.index(mask).long(), mask.reshape(-1).nonzero().reshape(-1))
    del mask, other
    gc.collect()
