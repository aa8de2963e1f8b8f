"""Host-side helpers shared by the Triton kernel modules (:mod:`.nm`, :mod:`._nm_conv`,
:mod:`.unstructured`): the interpreter compatibility fix, the fp32 matmul precision, SM counts, and
the ahead-of-time compilation spec (:class:`AotSpec`, :func:`specialize`) that
:mod:`sparsefast.kernel_report` reads from each module's ``aot_compile_configs()``.

Importing this module applies :func:`fix_interpreter_loops` and :func:`fix_interpreter_masks` when
``TRITON_INTERPRET=1`` is set.
(Private module: the kernel report scans only public modules for ``aot_compile_configs``.)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Mapping, NamedTuple

import torch

from . import interpreting, tf32_enabled

__all__ = ["AotSpec", "DTYPE_NAMES", "cuda_sms", "device_guard", "fix_interpreter_loops", "fix_interpreter_masks",
           "prec", "specialize"]


# ------------------------------------------------------------------------------------------------
# Triton interpreter (TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------
def fix_interpreter_loops() -> None:
    """Triton 3.6's interpreter turns a runtime loop bound (``range(lo, n)`` with a tensor ``n``)
    into a Python int with ``int(1-element array)``, which NumPy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted"). Wrap its tensor patcher so ``__index__`` takes the single element.

    Idempotent (the patched function carries a ``_sparsefast_compat`` marker); harmless with older
    NumPy; only needed -- and only applied on import -- under ``TRITON_INTERPRET=1``."""
    from triton.runtime import interpreter as it

    orig = it._patch_lang_tensor
    if getattr(orig, "_sparsefast_compat", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsefast_compat = True  # type: ignore[attr-defined]
    it._patch_lang_tensor = patched


def fix_interpreter_masks() -> None:
    """The interpreter computes ``bool_tensor & (scalar == 0)`` (e.g. ``n_ok & (pid_k == 0)``) as
    int32 0/1 data instead of bool (every version up to 3.9 at least); Triton 3.9's native masked
    load / store / atomic then reject it (``ValueError: mask has unsupported dtype``), where 3.8
    read it as a truth value. Wrap those three builder methods so a mask reaches them as bool.

    Idempotent (``_sparsefast_compat`` marker); only applied under ``TRITON_INTERPRET=1``."""
    import numpy as np
    from triton.runtime import interpreter as it

    builder = it.InterpreterBuilder
    if getattr(builder.create_masked_load, "_sparsefast_compat", False):
        return

    def as_bool(mask):
        if mask is None or mask.data.dtype == np.bool_:
            return mask
        return it.TensorHandle(mask.data != 0, mask.dtype)

    def wrap(name, mask_pos):
        orig = getattr(builder, name)

        def patched(self, *args, **kwargs):
            args = list(args)
            if len(args) > mask_pos:
                args[mask_pos] = as_bool(args[mask_pos])
            elif "mask" in kwargs:
                kwargs["mask"] = as_bool(kwargs["mask"])
            return orig(self, *args, **kwargs)

        patched._sparsefast_compat = True  # type: ignore[attr-defined]
        setattr(builder, name, patched)

    # positions after ``self``: (ptrs, mask, other, ...), (ptrs, value, mask, ...),
    # (rmwOp, ptr, val, mask, ...)
    wrap("create_masked_load", 1)
    wrap("create_masked_store", 2)
    wrap("create_atomic_rmw", 3)


if interpreting():
    fix_interpreter_loops()
    fix_interpreter_masks()


# ------------------------------------------------------------------------------------------------
# launch-time helpers
# ------------------------------------------------------------------------------------------------
def prec(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp32 follows torch's matmul setting (TF32 only when torch
    allows it, never in the interpreter); 16-bit types ignore it."""
    if dtype == torch.float32 and not interpreting() and tf32_enabled():
        return "tf32"
    return "ieee"


def device_guard(device: torch.device):
    """Context in which Triton launches target ``device``: ``torch.cuda.device(device)`` for a CUDA
    tensor (Triton launches on the *current* device; a tensor on another GPU would be read through
    the wrong context -- illegal address), a no-op otherwise (CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def cuda_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (cached)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


# ------------------------------------------------------------------------------------------------
# ahead-of-time compilation specs (no GPU needed)
# ------------------------------------------------------------------------------------------------
#: the Triton type names of the supported dtypes (also used in spec names)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AotSpec(NamedTuple):
    """One compilable kernel variant::

        triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                                 attrs=attrs),
                       target=GPUTarget("cuda", arch, 32), options=options)

    ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``);
    ``constexprs`` maps names to values; ``attrs`` maps ``(arg_index,)`` to ``[["tt.divisibility", 16]]``;
    ``options`` is ``{"num_warps": w, "num_stages": s}``; ``name`` a readable label; ``expect`` what the
    compiled code must show, checked by :mod:`sparsefast.kernel_report` (keys in its ``EXPECT_KEYS``:
    tensor cores, wgmma on sm_90, no spills in ``hot`` kernels, ...)."""

    kernel: Any
    signature: dict
    constexprs: dict
    options: dict
    attrs: dict
    name: str
    expect: dict | None = None


def specialize(kernel, pointers: Mapping[str, str] | Callable[[str], str], ints: Mapping[str, int],
               constexprs: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of ``kernel`` called with these pointer types and int values,
    specialised the way ``triton.runtime.jit`` does it: integer arguments equal to 1 become constexprs,
    multiples of 16 and (16-byte aligned) pointers get the divisibility hint.

    ``pointers``: the Triton type of each pointer argument (a dict, or a function of the name);
    ``ints``: a representative value of every other non-constexpr argument."""
    ptr_type = pointers if callable(pointers) else None
    sig, const, attrs = {}, dict(constexprs), {}
    for i, a in enumerate(kernel.arg_names):
        if a in constexprs:
            sig[a] = "constexpr"
        elif (ptr_type is not None and a.endswith("_ptr")) or (ptr_type is None and a in pointers):
            sig[a] = ptr_type(a) if ptr_type is not None else pointers[a]  # type: ignore[index]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[a] == 1:
            sig[a] = "constexpr"
            const[a] = 1
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs
