"""Compile-time evidence for the GPU kernels, on any machine (no GPU needed).

Every Triton kernel, in every configuration its autotuner may pick, is compiled ahead of time for
sm_80 (A100) and sm_90 (H100: Triton targets ``sm_90a``), and every csrc CUDA kernel with ``nvcc``
for ``sm_80`` and ``sm_90a`` (or read from an already built ``.so``). For each kernel and target the
report gives registers per thread, spills / local memory, shared memory, an estimated occupancy on
that GPU, and which instructions are in the code: tensor-core MMA (``mma.sync``/``HMMA``,
``wgmma``/``HGMMA``, their sparse ``.sp`` forms) and 128-bit global loads (``ld.global.v4``,
16-byte ``cp.async``, TMA; ``LDG.E.128``/``LDGSTS.*.128``/``UTMALDG`` in SASS).

Where the numbers come from
---------------------------
* Triton: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
  arch, 32), options=...)`` in a child process whose environment has no ``TRITON_INTERPRET`` (the
  interpreter replaces ``@triton.jit`` functions, so nothing could be compiled in a process that set
  it). Registers / local memory from ``cuobjdump --dump-resource-usage`` on the cubin, shared memory
  from the compiled metadata (what the launcher requests), instructions from the PTX and from
  ``cuobjdump -sass``.
* CUDA (``csrc/*.cu``): ``nvcc -cubin -Xptxas -v`` with the flags of :mod:`sparsefast._build_cuda`
  (PTX kept), then the same ``cuobjdump`` reads; spill bytes from the ``-Xptxas -v`` log. Or, with
  ``cuda_objects_report``, from a built ``.so``/``.o``/``.cubin`` (``cuobjdump`` only: local memory
  bytes and ``STL``/``LDL`` in SASS stand in for the spill counts).

Occupancy model
---------------
Resident blocks per SM = min over: registers (``ceil(regs*32, 256)`` per warp from 65536),
shared memory (``static + dynamic`` rounded to 128 B, plus the 1 KB the driver reserves per block,
from 164 KB on A100 / 228 KB on H100), threads (2048), blocks (32); occupancy = resident warps / 64.
A block whose shared memory exceeds the per-block opt-in limit (163 KB / 227 KB) cannot launch on that
GPU (Triton's autotuner skips such a config: reported as a warning).

Expectations: the ``expect`` dict
---------------------------------
Kernel authors state what a kernel must compile to; the report checks it. For Triton, an entry of
``aot_compile_configs()`` may carry ``expect`` (a dict key, a NamedTuple field or an attribute).
For CUDA, a comment anywhere in ``csrc/`` (``*.cu``, ``*.cuh``, ``*.h``)::

    // kernel-report: <regex> key[=value] key[=value] ...

applies to every kernel whose demangled name with all spaces removed matches ``<regex>``
(``re.search``; e.g. ``sf24_gemm_kernel`` or ``sf24_gemm_kernel<.*Cfg<128,128,64``); several matching
lines merge in file order, later ones winning. A bare ``key`` means ``True``. Keys (see
:data:`EXPECT_KEYS`):

``tensor_core``  ``True``: some tensor-core MMA must be in the code; ``"sparse"``: a sparse one
                 (``mma.sp``/``wgmma.sp``, SASS ``HMMA.SP``/``HGMMA...SP``). Missing = error.
``wgmma``        ``True``: on sm_90 the MMA must be the warpgroup ``wgmma`` (SASS ``HGMMA``), not
                 the A100-style ``mma.sync``. Ignored for sm_80. Missing = error.
``vector_loads`` ``True``: 128-bit global loads must be there. Missing = warning.
``packed_stores`` ``True``: the code must hold global stores of 32 bits or wider (16-bit outputs
                 stored as packed pairs ``st.global.b32`` / vectors, not only ``st.global.b16``:
                 SASS ``STG.E``/``.64``/``.128`` vs ``STG.E.U16``). Only 8/16-bit stores = error.
``hot``          ``True``: the kernel is on the per-step path; register spills / local memory are an
                 error (in any kernel they are a warning).
``min_occupancy`` float in (0, 1]: estimated occupancy below it = warning.
``threads``      int: threads per block, for the occupancy estimate (Triton: ``num_warps*32``; CUDA:
                 read from ``__launch_bounds__`` when present, else give it here).
``dyn_smem``     int: dynamic shared memory bytes per block (CUDA; Triton knows its own).
``archs``        list of ints, e.g. ``[90]``: Triton: the targets this entry is compiled for
                 (default: every target of the run); CUDA (``archs=90``): the targets the checks
                 apply to (an sm_90-only kernel's sm_80 stub is still listed, unchecked).

An unknown key or a value of the wrong type is itself an error, so typos cannot silence a check.
Whatever the ``expect``: a ptxas note that it serialized a kernel's ``wgmma`` instructions
("Potential Performance Loss: wgmma.mma_async instructions are serialized due to ...", e.g. C7520 for
a wgmma on a divergent path) is an error (CUDA, from the ``-Xptxas -v`` log; a built ``.so`` has no
log: .ci/compile_cuda.sh checks its build log instead).

Without ``expect`` the instructions and resources are still reported, but only compile errors and
launch-limit problems are flagged.

Exit status (``python -m sparsefast kernels``): non-zero when any row has an error: a compile or
import failure, a spill in a ``hot`` kernel, a missing tensor-core instruction that ``expect`` asks
for, or a bad ``expect``. A missing tool (no Triton, no nvcc, no cuobjdump) is a per-row status, not an
error (``--require-compiled`` makes it one); nor is a compile left undone when the ``--timeout``
budget runs out (status ``not-run``, listed; ``--strict`` makes it one).

Modules
-------
:mod:`.model` (GPU limits, occupancy, :class:`KernelResult`, :func:`evaluate`), :mod:`.expect` (the
``expect`` dict, ``// kernel-report:`` annotations), :mod:`.parsers` (compiler output), :mod:`.tools`
(nvcc / cuobjdump / c++filt), :mod:`.triton_aot` (Triton compiles and their worker processes),
:mod:`.cuda_ptxas` (csrc CUDA compiles, built binaries), :mod:`.render` (table, JSON, exit status).
Every name is importable from ``sparsefast.kernel_report`` itself.
"""
from __future__ import annotations

from .model import (DEFAULT_ARCHS, ERROR, LIMITS, NOT_RUN, OK, SKIPPED, KernelResult, SMLimits, _round_up,
                    evaluate, occupancy)
from .expect import (_ANNOT_RE, EXPECT_KEYS, _parse_value, match_annotations, parse_annotations,
                     validate_expect)
from .parsers import (_PTX_PATTERNS, _SASS_FN_RE, _SASS_INSN_RE, parse_elf_max_threads, parse_ptxas_verbose,
                      parse_resource_usage, parse_sass, parse_wgmma_serialization, ptx_features, ptx_functions,
                      sass_features, store_widths, tensor_core_kind, vector_load_count)
from .tools import _SHORT, _find_tool, _run, _triton_bin, cuobjdump_reads, demangle, find_tool, short_name
from .triton_aot import (_WORKER_BOOT, TRITON_PACKAGE, _Capture, _clean_env, _compile_triton_one, _config_label,
                         _error_lines, _kernel_name, _label, _read_jsonl, _spec_fields, _triton_tasks,
                         _triton_worker, _worker_main, default_triton_providers, triton_report)
from .cuda_ptxas import (_build_settings, _gencode, _needs_torch, _repo_root, _rows_from_binary,
                         csrc_annotations, cuda_objects_report, cuda_report)
from .render import _fmt_occ, _sm, exit_code, format_table, summary, to_json
