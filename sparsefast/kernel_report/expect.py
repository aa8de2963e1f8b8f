"""Expectations: the ``expect`` dict (:data:`EXPECT_KEYS`, :func:`validate_expect`) and the
``// kernel-report:`` annotations of CUDA sources (format: :mod:`sparsefast.kernel_report`)."""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

# ------------------------------------------------------------------------------------------------
# expectations
# ------------------------------------------------------------------------------------------------
#: expect key -> (accepted python types, description)
EXPECT_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "tensor_core": ((bool, str), "True: some tensor-core MMA; 'sparse': mma.sp / wgmma.sp"),
    "wgmma": ((bool,), "True: on sm_90 the MMA is wgmma (HGMMA), not mma.sync"),
    "vector_loads": ((bool,), "True: 128-bit global loads present (warning if not)"),
    "packed_stores": ((bool,), "True: global stores of 32 bits or wider present (16-bit outputs as packed "
                                "pairs / vectors; error if only 8/16-bit scalar stores)"),
    "hot": ((bool,), "True: spills / local memory are an error"),
    "min_occupancy": ((float, int), "warn below this estimated occupancy (0..1)"),
    "threads": ((int,), "threads per block (occupancy input)"),
    "dyn_smem": ((int,), "dynamic shared memory bytes per block (occupancy input)"),
    "archs": ((list, tuple), "targets to compile this entry for, e.g. [90] (Triton)"),
}


def validate_expect(expect: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Check an ``expect`` dict against :data:`EXPECT_KEYS`: returns (the valid part, error texts)."""
    if expect is None:
        return {}, []
    if not isinstance(expect, Mapping):
        return {}, [f"expect must be a dict, got {type(expect).__name__}"]
    good, errors = {}, []
    for k, v in expect.items():
        if k not in EXPECT_KEYS:
            errors.append(f"unknown expect key {k!r} (known: {', '.join(EXPECT_KEYS)})")
            continue
        types = EXPECT_KEYS[k][0]
        if isinstance(v, bool) and bool not in types:
            errors.append(f"expect[{k!r}] must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
            continue
        if not isinstance(v, types):
            errors.append(f"expect[{k!r}] must be {'/'.join(t.__name__ for t in types)}, got {v!r}")
            continue
        if k == "tensor_core" and isinstance(v, str) and v != "sparse":
            errors.append(f"expect['tensor_core'] must be True/False or 'sparse', got {v!r}")
            continue
        if k == "min_occupancy" and not 0 < float(v) <= 1:
            errors.append(f"expect['min_occupancy'] must be in (0, 1], got {v!r}")
            continue
        if k == "archs" and not all(isinstance(a, int) for a in v):
            errors.append(f"expect['archs'] must be a list of ints like [80, 90], got {v!r}")
            continue
        good[k] = v
    return good, errors


_ANNOT_RE = re.compile(r"//\s*kernel-report:\s*(\S+)(.*)$")


def _parse_value(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "1"):
        return True
    if low in ("false", "no", "0"):
        return False
    if "," in v:
        return [_parse_value(x) for x in v.split(",") if x]
    try:
        return int(v, 0)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def parse_annotations(text: str, origin: str = "") -> list[tuple[str, dict[str, Any], str]]:
    """``// kernel-report: <regex> key[=value] ...`` lines of a CUDA source -> [(regex, expect, where)].
    ``archs=80,90`` style comma lists become lists; numbers become int/float; bare keys ``True``."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        m = _ANNOT_RE.search(line)
        if not m:
            continue
        exp: dict[str, Any] = {}
        for tok in m.group(2).split():
            k, eq, v = tok.partition("=")
            exp[k] = _parse_value(v) if eq else True
        if "archs" in exp and not isinstance(exp["archs"], list):
            exp["archs"] = [exp["archs"]]
        out.append((m.group(1), exp, f"{origin}:{i}"))
    return out


def match_annotations(annotations: Sequence[tuple[str, dict, str]], name: str) -> tuple[dict, list[str]]:
    """Merge the expect dicts of every annotation whose regex matches ``name`` (demangled, spaces
    removed). Returns (expect, error texts for invalid regexes)."""
    key = re.sub(r"\s+", "", name)
    merged: dict[str, Any] = {}
    errors = []
    for rx, exp, where in annotations:
        try:
            hit = re.search(rx, key) is not None
        except re.error as e:
            errors.append(f"{where}: bad kernel-report regex {rx!r}: {e}")
            continue
        if hit:
            merged.update(exp)
    return merged, errors
