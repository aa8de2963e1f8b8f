"""Parsers of compiler output: ``ptxas -v``, ``cuobjdump --dump-resource-usage`` / ``-sass`` / ``-elf``,
PTX; instruction features (tensor-core MMA kind, 128-bit global loads)."""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

# ------------------------------------------------------------------------------------------------
# parsers: ptxas -v, cuobjdump --dump-resource-usage / -sass / -elf, PTX
# ------------------------------------------------------------------------------------------------
#: ptxas's "Potential Performance Loss: wgmma.mma_async instructions are serialized due to ..." notes
#: (C7508-C7520...: a wgmma in divergent control flow, non-wgmma writes to accumulators inside the
#: pipeline, a wgmma pipeline crossing a call, too few registers, ...). Each means ptxas inserted a
#: wait after every wgmma: the kernel runs with no MMA overlap at all.
_WGMMA_SERIAL_RE = re.compile(r"(?:\((C\d+)\)\s*)?[^\n]*?wgmma\S*\s+instructions are serialized[^\n]*", re.I)
_IN_FUNCTION_RE = re.compile(r"in the function '([^']+)'")


def parse_wgmma_serialization(text: str) -> dict[str, list[str]]:
    """ptxas log -> {mangled function ('' when the note names none): [note, ...]} for every
    "wgmma.mma_async instructions are serialized" note (see :data:`_WGMMA_SERIAL_RE`)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _WGMMA_SERIAL_RE.search(line)
        if not m:
            continue
        fn = _IN_FUNCTION_RE.search(line)
        note = _IN_FUNCTION_RE.sub("", re.sub(r"^.*?(\(C\d+\))", r"\1", line.strip())).rstrip()
        out.setdefault(fn.group(1) if fn else "", []).append(note[:400])
    return out


def parse_ptxas_verbose(text: str) -> dict[str, dict[str, Any]]:
    """``nvcc -Xptxas -v`` / ``ptxas -v`` log -> {mangled function: {arch, regs, stack,
    spill_stores, spill_loads, smem (static bytes), barriers[, wgmma_serialized]}};
    ``wgmma_serialized``: ptxas's wgmma serialization notes for that function
    (:func:`parse_wgmma_serialization`; a note naming no function goes to the function being compiled)."""
    out: dict[str, dict[str, Any]] = {}
    cur: dict[str, Any] | None = None
    for line in text.splitlines():
        if _WGMMA_SERIAL_RE.search(line):
            fn = _IN_FUNCTION_RE.search(line)
            tgt = out.setdefault(fn.group(1), {}) if fn else cur
            if tgt is None:
                tgt = out.setdefault("", {})
            tgt.setdefault("wgmma_serialized", []).extend(parse_wgmma_serialization(line).popitem()[1])
            continue
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            cur["arch"] = m.group(2)
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            if b:
                cur["barriers"] = int(b.group(1))
    return out


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {function: {REG, STACK, SHARED, LOCAL, ...}}.
    When the file holds several targets, keys are only from the ``-arch`` asked for; call once per
    target."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):\s*$", line)
        if m:
            cur = m.group(1)
            continue
        if cur is not None and "REG:" in line:
            out[cur] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            cur = None
    return out


_SASS_FN_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN_RE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def parse_sass(text: str) -> dict[str, Counter]:
    """``cuobjdump -sass`` / ``nvdisasm`` text -> {function: Counter(full opcode, e.g. 'HMMA.SP.16832.F32.BF16')}."""
    out: dict[str, Counter] = {}
    cur: Counter | None = None
    for line in text.splitlines():
        m = _SASS_FN_RE.match(line)
        if m:
            cur = out.setdefault(m.group(1), Counter())
            continue
        if cur is None:
            continue
        m = _SASS_INSN_RE.search(line)
        if m:
            cur[m.group(1)] += 1
    return out


def parse_elf_max_threads(text: str) -> dict[str, int]:
    """``cuobjdump -elf`` -> {function: max threads per block} from ``EIATTR_MAX_THREADS``
    (``__launch_bounds__``) or ``EIATTR_REQNTID`` (``.reqntid``)."""
    out: dict[str, int] = {}
    cur = None
    want = False
    for line in text.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur, want = m.group(1), False
            continue
        if cur is None:
            continue
        if re.search(r"Attribute:\s*EIATTR_(MAX_THREADS|REQNTID)\b", line):
            want = True
            continue
        if want and "Value:" in line:
            dims = [int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]+", line)]
            if dims:
                n = 1
                for d in dims:
                    n *= max(d, 1)
                out[cur] = n
            want = False
    return out


def ptx_functions(ptx: str) -> dict[str, str]:
    """Split PTX into {entry name: body text} (``.entry`` functions only)."""
    out = {}
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+([\w$]+)\s*\(", ptx)]
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        out[name] = ptx[pos:end]
    return out


_PTX_PATTERNS = {
    "mma": re.compile(r"(?<![\w.])mma\.sync\.aligned"),
    "mma.sp": re.compile(r"(?<![\w.])mma\.sp(?:::ordered_metadata)?\.sync"),
    "wgmma": re.compile(r"\bwgmma\.mma_async\.sync"),
    "wgmma.sp": re.compile(r"\bwgmma\.mma_async\.sp"),
    "ld.global.128": re.compile(r"\bld\.global(?:\.[\w:]+)*\.(?:v4\.(?:b32|f32|u32|s32)|v2\.(?:b64|f64|u64|s64))\b"),
    "cp.async.16": re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s*\[[^\]]*\]\s*,\s*\[[^\]]*\]\s*,\s*(?:16|0x10)\b"),
    "tma": re.compile(r"\bcp\.async\.bulk"),
    "st.local": re.compile(r"\bst\.local\b"),
    # global stores by width: 8/16-bit scalars vs 32-bit and wider (b32 / v2 / v4, packed bf16x2 included)
    "st.global.narrow": re.compile(r"\bst\.global(?:\.[\w:]+)*?\.(?:b8|u8|s8|b16|u16|s16|f16|bf16)\s"),
    "st.global.wide": re.compile(r"\bst\.global(?:\.[\w:]+)*?\.(?:v[248]\.)?(?:b32|u32|s32|f32|b64|u64|s64|f64|"
                                 r"f16x2|bf16x2|b128)\s"),
}


def ptx_features(body: str) -> dict[str, int]:
    """Counts of the instruction classes of interest in PTX text (one function or a whole module)."""
    return {k: len(rx.findall(body)) for k, rx in _PTX_PATTERNS.items()}


def sass_features(ops: Counter) -> dict[str, int]:
    """Counts of the instruction classes of interest from a SASS opcode Counter."""
    f = dict.fromkeys(("HMMA", "HMMA.SP", "HGMMA", "HGMMA.SP", "IMMA", "LDG.128", "LDGSTS.128", "TMA",
                       "LDG", "STL", "LDL", "STG.NARROW", "STG.WIDE"), 0)
    for op, n in ops.items():
        parts = op.split(".")
        head, sp = parts[0], "SP" in parts[1:]
        if head == "HMMA":
            f["HMMA.SP" if sp else "HMMA"] += n
        elif head == "HGMMA":
            f["HGMMA.SP" if sp else "HGMMA"] += n
        elif head in ("IMMA", "QGMMA", "IGMMA", "OMMA"):
            f["IMMA"] += n
        elif head == "LDG":
            f["LDG"] += n
            if "128" in parts:
                f["LDG.128"] += n
        elif head == "LDGSTS" and "128" in parts:
            f["LDGSTS.128"] += n
        elif head in ("UTMALDG", "UBLKCP"):
            f["TMA"] += n
        elif head == "STG":  # STG.E.U16 / .S8 ...: narrow; STG.E (32-bit), .64, .128: wide
            f["STG.NARROW" if {"U8", "S8", "U16", "S16"} & set(parts[1:]) else "STG.WIDE"] += n
        elif head == "STL":
            f["STL"] += n
        elif head == "LDL":
            f["LDL"] += n
    return f


def tensor_core_kind(sass: dict[str, int] | None, ptx: dict[str, int] | None) -> str | None:
    """The best tensor-core instruction seen: 'wgmma.sp' > 'wgmma' > 'mma.sp' > 'mma' (SASS preferred
    over PTX when both are known), or None."""
    if sass:
        for k, name in (("HGMMA.SP", "wgmma.sp"), ("HGMMA", "wgmma"), ("HMMA.SP", "mma.sp"), ("HMMA", "mma"),
                        ("IMMA", "mma")):
            if sass.get(k):
                return name
        return None
    if ptx:
        for k in ("wgmma.sp", "wgmma", "mma.sp", "mma"):
            if ptx.get(k):
                return k
    return None


def store_widths(sass: dict[str, int] | None, ptx: dict[str, int] | None) -> tuple[int, int] | None:
    """(8/16-bit global stores, 32-bit-or-wider global stores) in the code, SASS preferred; None when
    neither is known (older report rows lack the counts)."""
    if sass and "STG.WIDE" in sass:
        return sass["STG.NARROW"], sass["STG.WIDE"]
    if ptx and "st.global.wide" in ptx:
        return ptx["st.global.narrow"], ptx["st.global.wide"]
    return None


def vector_load_count(sass: dict[str, int] | None, ptx: dict[str, int] | None) -> int | None:
    """Number of 128-bit global loads (incl. 16-byte cp.async and TMA), SASS preferred."""
    if sass:
        return sass["LDG.128"] + sass["LDGSTS.128"] + sass["TMA"]
    if ptx:
        return ptx["ld.global.128"] + ptx["cp.async.16"] + ptx["tma"]
    return None
