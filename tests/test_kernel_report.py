"""The kernel report (sparsefast.kernel_report): parsers on canned compiler output, the occupancy model,
the ``expect`` checks, and real ahead-of-time compiles without a GPU (a small Triton kernel for sm_80 /
sm_90 in a child process without TRITON_INTERPRET; a tiny .cu with nvcc when it is installed)."""
from __future__ import annotations

import json
import shutil
import textwrap
from collections import Counter

import pytest

from sparsefast import kernel_report as kr
from sparsefast.cli import kernels as cli

# ------------------------------------------------------------------------------------------------
# canned tool output (trimmed from real nvcc 13.0 / cuobjdump 12.8 runs on csrc/sf24.cu)
# ------------------------------------------------------------------------------------------------
GEMM = "_ZN2sf39_GLOBAL__N__ad5f79ad_7_sf24_cu_a353150616sf24_gemm_kernelI13__nv_bfloat16fNS0_3CfgILi128ELi128ELi64ELi2ELi4ELi1ELi3EEELb0EEEvNS_12Sf24GemmArgsE"
PACK = "_ZN2sf39_GLOBAL__N__ad5f79ad_7_sf24_cu_a353150616sf24_pack_kernelI13__nv_bfloat16EEvPKT_PKhllllPS3_Pj"

PTXAS_V = f"""\
ptxas warning : Registers are spilled to local memory in function '{GEMM}', 16 bytes spill stores, 20 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '{GEMM}' for 'sm_80'
ptxas info    : Function properties for {GEMM}
    16 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes cumulative stack size, 520 bytes cmem[0]
ptxas info    : Compile time = 685.588 ms
ptxas info    : Compiling entry function '{PACK}' for 'sm_80'
ptxas info    : Function properties for {PACK}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 2048 bytes smem, 400 bytes cmem[0]
"""

RES_USAGE = f"""
Fatbin elf code:
================
arch = sm_80
code version = [1,8]
host = linux
compile_size = 64bit

Resource usage:
 Common:
  GLOBAL:0
 Function {GEMM}:
  REG:128 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:520 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function {PACK}:
  REG:40 STACK:0 SHARED:2048 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = f"""
\tcode for sm_80
\t.target\tsm_80

\t\tFunction : {GEMM}
\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;       /* 0x00000a00ff017624 */
                                                                                 /* 0x000fe400078e00ff */
        /*0520*/                   LDGSTS.E.BYPASS.128 [R15], [R12.64], P0 ;     /* 0x000000000c0f7fae */
        /*06f0*/               @P1 LDGSTS.E.BYPASS.128 [R15], [R12.64], P0 ;     /* 0x000000000c0f7fae */
        /*0700*/                   STL [R1], R4 ;                                /* 0x0000000401007387 */
        /*0710*/                   LDL R4, [R1] ;                                /* 0x0000000001047983 */
        /*c720*/              @!P1 HMMA.SP.16832.F32.BF16 R24, R28.reuse, R32, R24, R68.reuse, 0x0 ; /* 0x000444201c18923c */
        /*c750*/                   HMMA.16816.F32.BF16 R20, R28, R36, R20 ;      /* 0x000444241c14923c */
        /*c760*/                   EXIT ;                                        /* 0x000000000000794d */
\t\t..........

\t\tFunction : {PACK}
        /*0000*/                   LDG.E.128.CONSTANT R4, [R2.64] ;              /* 0x0000000402047981 */
        /*0010*/                   LDG.E.U8 R8, [R2.64] ;                        /* 0x0000000402087981 */
        /*0020*/                   STG.E.128 [R6.64], R4 ;                       /* 0x0000000406007986 */
\t\t..........
"""

ELF = f"""
.nv.info.{GEMM}
\t<0x1>
\tAttribute:\tEIATTR_CUDA_API_VERSION
\tFormat:\tEIFMT_SVAL
\tValue:\t0x82
\t<0x10>
\tAttribute:\tEIATTR_MAX_THREADS
\tFormat:\tEIFMT_SVAL
\tValue:\t0x100 0x1 0x1
.nv.info.{PACK}
\tAttribute:\tEIATTR_REQNTID
\tFormat:\tEIFMT_SVAL
\tValue:\t0x80 0x1 0x1
"""

PTX = """
.version 8.7
.target sm_90a
.visible .entry dense_k(
\t.param .u64 dense_k_param_0
)
.reqntid 256
{
\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
\t@%p1 ld.global.nc.L1::evict_last.v2.b64 { %rd5, %rd6 }, [ %rd2 + 0 ];
\tcp.async.cg.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 0x10, %r10;
\tcp.async.cg.shared.global [ %r9 + 16 ], [ %rd3 + 16 ], 16;
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %f1, %f2, %f3, %f4 }, { %r1, %r2, %r3, %r4 }, { %r5, %r6 }, { %f1, %f2, %f3, %f4 };
\twgmma.fence.sync.aligned;
\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r238}, %rd27, %rd28, %p4, 1, 1, 0, 1;
}
.visible .entry sparse_k(
\t.param .u64 sparse_k_param_0
)
{
\tld.global.b32 %r1, [ %rd1 + 0 ];
\tcp.async.ca.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 4;
\tmma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1}, %r3, 0x0;
\tst.local.u32 [%rd9], %r1;
}
"""


# ------------------------------------------------------------------------------------------------
# parsers
# ------------------------------------------------------------------------------------------------
def test_parse_ptxas_verbose():
    p = kr.parse_ptxas_verbose(PTXAS_V)
    assert p[GEMM] == dict(arch="sm_80", stack=16, spill_stores=16, spill_loads=20, regs=128, smem=0, barriers=1)
    assert p[PACK]["regs"] == 40 and p[PACK]["smem"] == 2048 and p[PACK]["spill_stores"] == 0


SM90 = "_ZN2sf44_GLOBAL__N__1d520259_11_sf24_sm90_cu_5961b3e421sf24_gemm_sm90_kernelI13__nv_bfloat16S2_Lb0EEEvNS_12Sf24GemmArgsE"
# nvcc 13.0 -Xptxas -v on the sm_90a wgmma.sp kernel with its wgmma under a branch (before issue 15)
PTXAS_C7520 = f"""\
ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program dependence on compiler-inserted WG.AR in divergent path in the function '{SM90}'
ptxas info    : Compiling entry function '{SM90}' for 'sm_90a'
ptxas info    : Function properties for {SM90}
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 152 registers, used 1 barriers
ptxas info    : Compiling entry function '{PACK}' for 'sm_90a'
ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are serialized due to a wgmma pipeline crossing function boundary
ptxas info    : Used 40 registers
"""


def test_parse_wgmma_serialization():
    p = kr.parse_ptxas_verbose(PTXAS_C7520)
    notes = p[SM90]["wgmma_serialized"]
    assert len(notes) == 1 and notes[0].startswith("(C7520) Potential Performance Loss") and "divergent path" in notes[0]
    assert p[SM90]["regs"] == 152 and p[SM90]["spill_stores"] == 0
    # a note that names no function belongs to the entry being compiled
    assert p[PACK]["wgmma_serialized"][0].startswith("(C7510)") and p[PACK]["regs"] == 40
    assert "wgmma_serialized" not in kr.parse_ptxas_verbose(PTXAS_V)[GEMM]
    assert set(kr.parse_wgmma_serialization(PTXAS_C7520)) == {SM90, ""}
    # any serialization note fails the row, whatever the expect dict
    r = kr.evaluate(_row(arch=90, tensor_core="wgmma.sp", wgmma_serialized=notes))
    assert r.verdict == "FAIL" and "serialized the wgmma pipeline: (C7520)" in r.problems[0][1]
    # rows built from a compile log: the note reaches the kernel's row
    rows = kr._rows_from_binary("x.cu", "x.cu", 90, {SM90: {"REG": 152}}, {}, {}, {},
                                           kr.parse_ptxas_verbose(PTXAS_C7520), [])
    assert [r.verdict for r in rows] == ["FAIL"] and rows[0].wgmma_serialized == notes


def test_store_widths_and_packed_stores():
    f = kr.sass_features(Counter({"STG.E.U16": 4, "STG.E": 2, "STG.E.128": 1, "STG.E.64": 1}))
    assert (f["STG.NARROW"], f["STG.WIDE"]) == (4, 4) and kr.store_widths(f, None) == (4, 4)
    ptx = """
\tst.global.b16 [%rd1], %rs1;
\t@%p1 st.global.u16 [%rd1+2], %rs2;
\tst.global.b32 [%rd2], %r1;
\tst.global.v4.b32 [%rd3], {%r1, %r2, %r3, %r4};
\tst.global.v2.u32 [%rd3], {%r1, %r2};
\tst.global.f32 [%rd4], %f1;
"""
    d = kr.ptx_features(ptx)
    assert (d["st.global.narrow"], d["st.global.wide"]) == (2, 4) and kr.store_widths(None, d) == (2, 4)
    assert kr.store_widths({"LDG": 1}, None) is None  # rows without store counts are not judged
    narrow = kr.sass_features(Counter({"STG.E.U16": 8}))
    assert kr.evaluate(_row(sass=narrow, expect={"packed_stores": True})).verdict == "FAIL"
    assert kr.evaluate(_row(sass=narrow)).verdict == "ok"
    assert kr.evaluate(_row(sass=f, expect={"packed_stores": True})).verdict == "ok"
    assert kr.evaluate(_row(ptx=d, expect={"packed_stores": True})).verdict == "ok"
    assert kr.validate_expect({"packed_stores": 1})[1]  # bool only


def test_parse_resource_usage():
    u = kr.parse_resource_usage(RES_USAGE)
    assert set(u) == {GEMM, PACK}
    assert u[GEMM]["REG"] == 128 and u[GEMM]["STACK"] == 16 and u[GEMM]["LOCAL"] == 0
    assert u[PACK]["SHARED"] == 2048 and u[PACK]["CONSTANT[0]"] == 400


def test_parse_sass_and_features():
    s = kr.parse_sass(SASS)
    assert set(s) == {GEMM, PACK}
    assert s[GEMM]["LDGSTS.E.BYPASS.128"] == 2  # the predicated one counts too
    assert s[GEMM]["HMMA.SP.16832.F32.BF16"] == 1 and s[GEMM]["EXIT"] == 1
    f = kr.sass_features(s[GEMM])
    assert (f["HMMA.SP"], f["HMMA"], f["LDGSTS.128"], f["STL"], f["LDL"]) == (1, 1, 2, 1, 1)
    assert kr.tensor_core_kind(f, None) == "mma.sp"
    assert kr.vector_load_count(f, None) == 2
    g = kr.sass_features(s[PACK])
    assert (g["LDG"], g["LDG.128"], g["HMMA"]) == (2, 1, 0)  # STG.E.128 is a store, not a load
    assert kr.tensor_core_kind(g, None) is None
    h = kr.sass_features(Counter({"HGMMA.64x128x16.F32.BF16": 4, "UTMALDG.2D": 2}))
    assert kr.tensor_core_kind(h, None) == "wgmma" and kr.vector_load_count(h, None) == 2
    assert kr.tensor_core_kind(kr.sass_features(Counter({"HGMMA.64x128x32.F32.BF16.SP": 1})), None) == "wgmma.sp"


def test_parse_elf_max_threads():
    assert kr.parse_elf_max_threads(ELF) == {GEMM: 256, PACK: 128}


def test_ptx_features():
    fns = kr.ptx_functions(PTX)
    assert list(fns) == ["dense_k", "sparse_k"]
    d, s = kr.ptx_features(fns["dense_k"]), kr.ptx_features(fns["sparse_k"])
    assert (d["ld.global.128"], d["cp.async.16"], d["mma"], d["wgmma"], d["mma.sp"]) == (2, 2, 1, 1, 0)
    assert (s["ld.global.128"], s["cp.async.16"], s["mma"], s["mma.sp"], s["st.local"]) == (0, 0, 0, 1, 1)
    assert kr.tensor_core_kind(None, d) == "wgmma" and kr.tensor_core_kind(None, s) == "mma.sp"
    assert kr.vector_load_count(None, d) == 4 and kr.vector_load_count(None, s) == 0


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="no c++filt")
def test_demangle_short_name():
    full = kr.demangle([GEMM])[GEMM]
    assert "sf24_gemm_kernel" in full and "Cfg<128, 128, 64" in full
    assert kr.short_name(full) == "sf24_gemm_kernel<bf16, fp32, Cfg<128, 128, 64, 2, 4, 1, 3>, false>"


# ------------------------------------------------------------------------------------------------
# occupancy model
# ------------------------------------------------------------------------------------------------
def test_occupancy():
    # 158 regs -> 160 per thread: 5120 per warp, 12 warps of registers -> one 8-warp block (A100)
    o = kr.occupancy(80, 158, 64 * 1024, 256)
    assert (o["blocks"], o["limiter"], o["occupancy"]) == (1, "regs", 8 / 64)
    # 32 regs, no smem, 128 threads: 16 blocks by threads (64 warps) -> 100%
    o = kr.occupancy(90, 32, 0, 128)
    assert (o["blocks"], o["limiter"], o["occupancy"]) == (16, "threads", 1.0)
    # tiny blocks hit the 32-blocks-per-SM limit
    assert kr.occupancy(90, 16, 0, 32)["limiter"] == "blocks"
    # shared memory: (100 KB + 1 KB reserved) -> 1 block on A100 (164 KB), 2 on H100 (228 KB)
    assert kr.occupancy(80, 64, 100 * 1024, 128)["blocks"] == 1
    o = kr.occupancy(90, 64, 100 * 1024, 128)
    assert (o["blocks"], o["limiter"]) == (2, "smem")
    # 200 KB: cannot launch on A100 (163 KB per block), fits on H100
    assert not kr.occupancy(80, 64, 200 * 1024, 128)["fits"]
    assert kr.occupancy(90, 64, 200 * 1024, 128)["fits"]
    assert kr.occupancy(90, 64, 0, None)["occupancy"] is None


# ------------------------------------------------------------------------------------------------
# expectations
# ------------------------------------------------------------------------------------------------
def test_validate_expect():
    good, errs = kr.validate_expect({"tensor_core": "sparse", "hot": True, "min_occupancy": 0.25, "archs": [90]})
    assert errs == [] and good["tensor_core"] == "sparse"
    _, errs = kr.validate_expect({"tesnor_core": True})
    assert errs and "unknown expect key 'tesnor_core'" in errs[0]
    _, errs = kr.validate_expect({"hot": "yes", "tensor_core": "dense", "min_occupancy": 2, "threads": True})
    assert len(errs) == 4
    assert kr.validate_expect(None) == ({}, [])


def test_annotations():
    src = textwrap.dedent("""\
        // kernel-report: sf24_gemm_kernel tensor_core=sparse vector_loads hot
        // kernel-report: sf24_gemm_kernel<.*Cfg<128,128,64 dyn_smem=89088 min_occupancy=0.1
        template <class C> __global__ void sf24_gemm_kernel() {}
        // kernel-report: pack threads=256 archs=80,90
        // kernel-report: ([ bad=1
        """)
    ann = kr.parse_annotations(src, "x.cu")
    assert len(ann) == 4 and ann[0][2] == "x.cu:1"
    exp, errs = kr.match_annotations(ann, "sf24_gemm_kernel<bf16, fp32, Cfg<128, 128, 64, 2, 4, 1, 3>, false>")
    assert exp == dict(tensor_core="sparse", vector_loads=True, hot=True, dyn_smem=89088, min_occupancy=0.1)
    assert errs and "bad kernel-report regex" in errs[0]
    exp, _ = kr.match_annotations(ann, "sf24_gemm_kernel<bf16, fp32, Cfg<16, 32, 256, 1, 1, 4, 4>, true>")
    assert "dyn_smem" not in exp and exp["hot"] is True
    exp, _ = kr.match_annotations(ann, "sf24_pack_kernel<bf16>")
    assert exp == dict(threads=256, archs=[80, 90])


def _row(**kw) -> kr.KernelResult:
    base = dict(backend="cuda", arch=90, kernel="k", regs=64, threads=128, static_smem=0, dyn_smem=0,
                spill_stores=0, spill_loads=0, local_bytes=0, tensor_core="mma", vector_loads=4)
    base.update(kw)
    return kr.KernelResult(**base)


def test_evaluate_rules():
    assert kr.evaluate(_row()).verdict == "ok"
    # spills: an error only in hot kernels
    assert kr.evaluate(_row(spill_stores=16, spill_loads=20)).verdict == "warn"
    r = kr.evaluate(_row(spill_stores=16, spill_loads=20, expect={"hot": True}))
    assert r.verdict == "FAIL" and "spill" in r.problems[0][1]
    # only cuobjdump: local memory stands in for spills
    assert kr.evaluate(_row(spill_stores=None, local_bytes=24, expect={"hot": True})).verdict == "FAIL"
    # tensor cores
    assert kr.evaluate(_row(tensor_core=None, expect={"tensor_core": True})).verdict == "FAIL"
    assert kr.evaluate(_row(tensor_core="mma", expect={"tensor_core": "sparse"})).verdict == "FAIL"
    assert kr.evaluate(_row(tensor_core="wgmma.sp", expect={"tensor_core": "sparse", "wgmma": True})).verdict == "ok"
    assert kr.evaluate(_row(tensor_core="mma.sp", expect={"tensor_core": "sparse", "wgmma": True})).verdict == "FAIL"
    assert kr.evaluate(_row(arch=80, tensor_core="mma.sp", expect={"wgmma": True})).verdict == "ok"
    # warnings: vector loads, occupancy, launch limits
    assert kr.evaluate(_row(vector_loads=0, expect={"vector_loads": True})).verdict == "warn"
    assert kr.evaluate(_row(regs=255, threads=512, expect={"min_occupancy": 0.5})).verdict == "warn"
    assert kr.evaluate(_row(arch=80, dyn_smem=200 * 1024)).verdict == "warn"
    # expect inputs feed the occupancy estimate
    r = kr.evaluate(_row(threads=None, dyn_smem=None, expect={"threads": 256, "dyn_smem": 100 * 1024}))
    assert r.threads == 256 and r.occupancy["blocks"] == 2 and r.occupancy["limiter"] == "smem"
    # status rows
    assert kr.evaluate(kr.KernelResult("cuda", 80, "x", status=kr.SKIPPED, detail="no nvcc")).verdict == "skip"
    assert kr.evaluate(kr.KernelResult("cuda", 80, "x", status=kr.ERROR, detail="boom")).verdict == "FAIL"
    assert kr.evaluate(_row(), ["unknown expect key 'x'"]).verdict == "FAIL"


def test_exit_code_and_table():
    rows = [kr.evaluate(_row()), kr.evaluate(kr.KernelResult("cuda", 80, "x", status=kr.SKIPPED, detail="no nvcc"))]
    assert kr.exit_code(rows) == 0 and kr.exit_code(rows, require_compiled=True) == 1
    rows.append(kr.evaluate(_row(spill_stores=8, expect={"hot": True})))
    assert kr.exit_code(rows) == 1
    table = kr.format_table(rows)
    assert "verdict" in table.splitlines()[0] and "FAIL" in table and "skipped (tool missing" in table


def test_missing_tools_are_a_status(monkeypatch, tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("__global__ void k() {}\n")
    monkeypatch.setattr(kr, "find_tool", lambda name: None)
    rows = kr.cuda_report([80, 90], root=tmp_path)
    assert [r.status for r in rows] == [kr.SKIPPED, kr.SKIPPED] and "nvcc not found" in rows[0].detail
    assert kr.exit_code(rows) == 0 and kr.exit_code(rows, require_compiled=True) == 1
    rows = kr.cuda_objects_report(tmp_path / "missing.so", [80], root=tmp_path)
    assert rows[0].status == kr.ERROR


def test_cli_args_and_missing_objects(tmp_path, capsys):
    assert cli._archs("80,sm_90a") == [80, 90]
    out = tmp_path / "r.json"
    rc = cli.main(["--only", "cuda", "--cuda-objects", str(tmp_path / "none"), "--json", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    assert doc["summary"]["fail"] == 1 and doc["results"][0]["status"] == "error"
    assert "kernel / config" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# real compiles (no GPU needed)
# ------------------------------------------------------------------------------------------------
TOY = '''
import triton
import triton.language as tl


@triton.jit
def toy_mm(a_ptr, b_ptr, c_ptr, K, sa, sb, sc, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * sa + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * sb + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * sc + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def toy_add(x_ptr, y_ptr, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n) + 1.0, mask=o < n)


SIG = dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", K="i32", sa="i32", sb="i32", sc="i32",
           BM="constexpr", BN="constexpr", BK="constexpr")
ATTRS = {(i,): [["tt.divisibility", 16]] for i in range(7)}


def aot_compile_configs():
    return [
        dict(kernel=toy_mm, signature=SIG, constexprs=dict(BM=64, BN=64, BK=32), attrs=ATTRS,
             options=dict(num_warps=4, num_stages=2), name="mm64",
             expect=dict(tensor_core=True, wgmma=True, vector_loads=True, hot=True)),
        # a plain tuple, expecting something it cannot have: must FAIL
        (toy_add, dict(x_ptr="*fp32", y_ptr="*fp32", n="i32", B="constexpr"), dict(B=256),
         dict(num_warps=4), {}, "add256", dict(tensor_core=True, archs=[90])),
    ]
'''


@pytest.fixture(scope="module")
def triton_run(tmp_path_factory):
    pytest.importorskip("triton")
    d = tmp_path_factory.mktemp("toyprov")
    (d / "sf_toy_provider.py").write_text(TOY)
    keep = d / "keep"
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", str(d))
    mp.setenv("TRITON_INTERPRET", "1")  # as under the test suite: the report must clear it for its workers
    try:
        rows = kr.triton_report([80, 90], providers=["sf_toy_provider:aot_compile_configs", "no_such_module_xyz:f"],
                                jobs=2, keep_dir=str(keep), timeout=300)
    finally:
        mp.undo()
    return rows, keep


def test_triton_aot_compile(triton_run):
    rows, _ = triton_run
    by = {(r.kernel, r.arch): r for r in rows}
    assert ("toy_add", 80) not in by  # expect archs=[90]
    for arch, mma in ((80, "mma"), (90, "wgmma")):
        r = by[("toy_mm", arch)]
        assert r.status == kr.OK, r.detail
        assert r.config == "mm64" and r.threads == 128
        assert 16 < r.regs <= 255 and r.spilled == 0 and r.dyn_smem > 0
        assert r.tensor_core == mma and r.vector_loads > 0
        assert r.occupancy["occupancy"] > 0 and r.verdict == "ok", r.problems
    add = by[("toy_add", 90)]
    assert add.status == kr.OK and add.tensor_core is None and add.verdict == "FAIL"
    assert any("no tensor-core instruction" in p[1] for p in add.problems)
    bad = [r for r in rows if r.source == "no_such_module_xyz:f"]
    assert len(bad) == 1 and bad[0].status == kr.ERROR and "ModuleNotFoundError" in bad[0].detail


def test_objects_report_on_cubins(triton_run, tmp_path):
    """--cuda-objects path: cuobjdump on built cubins (Triton's here), expectations from csrc annotations."""
    _, keep = triton_run
    if kr.find_tool("cuobjdump") is None:
        pytest.skip("no cuobjdump")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "x.cu").write_text("// kernel-report: toy_mm tensor_core=sparse threads=128\n")
    cubins = sorted(keep.glob("toy_mm_sm90_*.cubin"))
    assert cubins
    rows = kr.cuda_objects_report(cubins[0], [90], root=tmp_path)
    assert len(rows) == 1
    r = rows[0]
    assert r.kernel == "toy_mm" and r.regs > 16 and r.threads == 128
    assert r.sass is not None and r.tensor_core == "wgmma" and r.vector_loads > 0
    assert r.verdict == "FAIL" and "dense wgmma only" in r.problems[0][1]


TINY_CU = r'''
// kernel-report: copy4 vector_loads hot
// kernel-report: scale threads=64 tensor_core
__global__ void __launch_bounds__(256) copy4(const float4* __restrict__ x, float4* __restrict__ y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}
extern "C" __global__ void scale(float* x, int n) {
  int i = threadIdx.x;
  if (i < n) x[i] *= 2.f;
}
'''


@pytest.mark.skipif(kr.find_tool("nvcc") is None or kr.find_tool("cuobjdump") is None, reason="no nvcc/cuobjdump")
def test_nvcc_compile(tmp_path):
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "tiny.cu").write_text(TINY_CU)
    rows = kr.cuda_report([80], root=tmp_path, keep_dir=str(tmp_path / "keep"))
    by = {r.kernel: r for r in rows}
    assert set(by) == {"copy4", "scale"}, [(r.kernel, r.detail) for r in rows]
    c = by["copy4"]
    assert c.status == kr.OK and c.threads == 256 and 0 < c.regs < 64
    assert c.spill_stores == 0 and c.vector_loads >= 1 and c.sass["LDG.128"] >= 1 and c.ptx["ld.global.128"] >= 1
    assert c.verdict == "ok" and c.occupancy["occupancy"] == 1.0
    s = by["scale"]
    assert s.threads == 64 and s.tensor_core is None and s.verdict == "FAIL"
    assert (tmp_path / "keep" / "tiny.sm_80.cubin").exists()
    # --cuda-objects on a shared library (as setup.py / compile_cuda.sh build it): cuobjdump only
    import subprocess
    so = tmp_path / "lib" / "tiny.so"
    so.parent.mkdir()
    subprocess.run([kr.find_tool("nvcc"), "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_80,code=sm_80",
                    "-o", str(so), str(tmp_path / "csrc" / "tiny.cu")], check=True, capture_output=True)
    rows = kr.cuda_objects_report(so.parent, [80, 90], root=tmp_path)
    by = {(r.kernel, r.arch): r for r in rows}
    c = by[("copy4", 80)]
    assert 0 < c.regs < 64
    assert c.threads == 256 and c.spill_stores is None and c.local_bytes == 0 and c.sass["LDG.128"] >= 1
    assert c.verdict == "ok" and by[("scale", 80)].verdict == "FAIL"
    miss = by[("(all kernels)", 90)]
    assert miss.status == kr.ERROR and "no sm_90 code" in miss.detail
