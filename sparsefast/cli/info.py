"""Versions, devices, and which backends are available here (and why not)."""
from __future__ import annotations

import argparse
import os
import platform


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="python -m sparsefast info", description=__doc__).parse_args(argv)
    import numpy
    import dataclasses

    import torch

    import sparsefast
    from sparsefast import backends

    print(f"sparsefast {sparsefast.__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"not importable ({type(e).__name__})"
    print(f"triton     {tv}   TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print(f"numpy      {numpy.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}     {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("cuda       no device")
    print(f"cpu        {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}")
    print("\nbackends:")
    for name in backends.names():
        why = backends.why_unavailable(name)
        print(f"  {name:10s} {'available' if why is None else 'unavailable: ' + why}")
        if why is None:
            desc = getattr(backends.get(name), "describe", None)
            if callable(desc):
                print(f"  {'':10s} {desc()}")
    order = {d: backends.auto_order(dataclasses.replace(backends.make_query("linear", None, torch.empty(64, 64, device="meta"),
                                                        "unstructured", dtype=torch.float32), device=torch.device(d)))
             for d in ("cpu", "cuda")}
    print("\nauto tries, per device (unstructured Linear; the order is built per call): "
          + "; ".join(f"{d}: {' > '.join(p)}" for d, p in order.items()))
    return 0
