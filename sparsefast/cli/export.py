"""Export a sparse model: PyTorch 2:4 (semi-structured), compressed safetensors, or ONNX for TensorRT.

MODEL_CHECKPOINT is one of
  * a whole model saved with ``torch.save(model, path)`` (a pickled nn.Module with SparseLinear /
    SparseConv2d or plain layers; unpickling runs code from the file: use trusted files only);
  * a state dict saved with ``torch.save(model.state_dict(), path)``, together with ``--model`` naming a
    factory that builds the architecture (sparse layers are recognised by their ``.mask`` entries);
  * a compressed checkpoint written by ``sparsefast.export.save`` (or by this command with
    ``--format safetensors``); ``--model`` is needed to export it to onnx / semi-structured.

Formats (output defaults to MODEL_CHECKPOINT's name with a new suffix):
  semi-structured  every 2:4 Linear weight becomes torch.sparse.SparseSemiStructuredTensor; the model is
                   saved with torch.save (needs an A100/H100-class GPU)                 -> *.semi.pt
  safetensors      sparsefast.export.save: kept values + mask bits (+ every other tensor) -> *.sparse.safetensors
  onnx             dense weights carrying the 2:4 pattern + a per-layer eligibility report -> *.onnx

For semi-structured and onnx every Linear/Conv2d (except those matching --skip, and those whose input
dim cannot hold 2:4 groups) must be 2:4: a layer that is not is an error naming it, unless --prune
magnitude-projects it onto 2:4 (reported per layer). For safetensors layers keep their own pattern
(any N:M or unstructured); --prune projects them onto 2:4 first.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

__all__ = ["main"]

_SUFFIX = {"semi-structured": ".semi.pt", "safetensors": ".sparse.safetensors", "onnx": ".onnx"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparsefast export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="MODEL_CHECKPOINT", help="model file (see above)")
    p.add_argument("--format", required=True, choices=sorted(_SUFFIX), help="what to write")
    p.add_argument("-o", "--output", help="output path (default: derived from MODEL_CHECKPOINT)")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="callable building the architecture, e.g. torchvision.models:resnet50 or mypkg.nets:build")
    p.add_argument("--prune", action="store_true", help="magnitude-project non-2:4 weights onto 2:4 (reported)")
    p.add_argument("--skip", metavar="REGEX", help="leave layers whose name matches REGEX out of the 2:4 requirement")
    p.add_argument("--input-shape", metavar="D0,D1,...",
                   help="onnx: example input shape (default: (1, in_features) or (1, C, 224, 224) from the first layer)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the model first")
    p.add_argument("--device", default=None, help="move the model first (semi-structured default: cuda)")
    return p


def _factory(spec: str):
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise SystemExit(f"export: --model must look like package.module:callable, got {spec!r}")
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj()


def _load_model(args):
    import torch
    from torch import nn

    from sparsefast import export as ex
    from sparsefast.nn import SparseConv2d, SparseLinear

    path = args.checkpoint
    if not os.path.isfile(path):
        raise SystemExit(f"export: no such file: {path!r}")
    if ex._is_sparsefast_safetensors(path):
        if args.model is None:
            if args.format != "safetensors":
                raise SystemExit("export: a sparsefast safetensors checkpoint holds weights, not the architecture; "
                                 "pass --model package.module:factory to export it to " + args.format)
            ck = ex.load(path)
            model = nn.Module()  # a container of the rebuilt sparse layers (the non-sparse entries are lost)
            for name, layer in ck.layers.items():
                parts = name.split(".")
                parent = model
                for p in parts[:-1]:
                    if not hasattr(parent, p):
                        parent.add_module(p, nn.Module())
                    parent = getattr(parent, p)
                parent.add_module(parts[-1], layer)
            print(f"note: {path} rebuilt without --model: only its {len(ck.layers)} sparse layers are re-exported")
            return model
        return ex.load(path, _factory(args.model))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"export: cannot read {path!r} as a torch.save file or sparsefast checkpoint: "
                         f"{type(e).__name__}: {e}") from e
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if args.model is None:
            raise SystemExit(f"export: {path!r} holds a state dict; pass --model package.module:factory")
        model = _factory(args.model)
        layers = {}
        mods = dict(model.named_modules())
        for k, v in obj.items():
            if k.endswith("mask") and v.dtype == torch.bool:
                name = k[: -len("mask")].rstrip(".")
                mod = mods.get(name)
                if isinstance(mod, (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)):
                    is24, _ = ex._reduction_24(v)
                    layers[name] = {"type": "SparseLinear" if isinstance(mod, (nn.Linear, SparseLinear)) else "SparseConv2d",
                                    "shape": list(v.shape), "pattern": "2:4" if is24 else "unstructured"}
        return ex._load_into(model, dict(obj), layers, where=repr(path))
    raise SystemExit(f"export: {path!r} holds a {type(obj).__name__}, not an nn.Module or a state dict")


def _example_input(model, shape_arg, dtype, device):
    import torch
    from torch import nn

    if shape_arg:
        shape = tuple(int(s) for s in shape_arg.replace("x", ",").split(",") if s.strip())
    else:
        first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) or hasattr(m, "mask")), None)
        if first is None:
            raise SystemExit("export: cannot guess the input shape; pass --input-shape")
        ws = tuple(first.weight_shape) if hasattr(first, "weight_shape") else tuple(first.weight.shape)
        shape = (1, ws[1]) if len(ws) == 2 else (1, ws[1] * getattr(first, "groups", 1), 224, 224)
    return torch.randn(shape, dtype=dtype, device=device)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import torch

    from sparsefast import export as ex

    try:
        model = _load_model(args)
        if args.dtype:
            model = model.to(getattr(torch, args.dtype))
        device = args.device or ("cuda" if args.format == "semi-structured" and torch.cuda.is_available() else None)
        if device:
            model = model.to(device)
        skip = re.compile(args.skip) if args.skip else None
        filt = (lambda n, m: not skip.search(n)) if skip else None
        if args.format != "safetensors" or args.prune:
            model, rep = ex.project_24(model, filter_fn=filt, prune=args.prune)
            changed = [r for r in rep if r["action"] in ("projected", "skipped")]
            for r in changed:
                if r["action"] == "projected":
                    print(f"pruned {r['name']} {r['shape']}: density {r['density_before']:.3f} -> "
                          f"{r['density_after']:.3f}, kept {100 * r['magnitude_kept']:.1f}% of sum|w|")
                else:
                    print(f"skipped {r['name']} {r['shape']}: input dim cannot hold 2:4 groups (left as is)")
        out = args.output or (re.sub(r"(\.sparse)?\.(pt|pth|bin|safetensors|ckpt)$", "", args.checkpoint)
                              + _SUFFIX[args.format])
        if args.format == "safetensors":
            ex.save(model, out)
        elif args.format == "onnx":
            p = next(iter(model.parameters()), None)
            dt = p.dtype if p is not None else torch.float32
            dev = p.device if p is not None else torch.device("cpu")
            ex.to_onnx(model.eval(), (_example_input(model, args.input_shape, dt, dev),), out)
        else:
            model = ex.to_semi_structured(model)
            with ex._atomic_path(out) as tmp:
                torch.save(model, tmp)
    except (ValueError, RuntimeError, TypeError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0
