"""The digits example runs end to end in quick mode (tiny budget) and writes its table and plot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the examples need scikit-learn")
pytest.importorskip("matplotlib", reason="the examples need matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_pruning_digits_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the example runs on the default CPU backends
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pruning_digits.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    md = (tmp_path / "results.md").read_text()
    assert "| method | 90% |" in md and "| RigL |" in md and "| SRSTE |" in md
    assert "What the papers report" in md
    assert '"runs"' in (tmp_path / "results.json").read_text()
    png = tmp_path / "results.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_prune_hf_2to4_quick():
    pytest.importorskip("transformers", reason="the example needs transformers (pip install -e .[hf])")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "prune_hf_2to4.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    for name in ("| Magnitude |", "| Wanda |", "| SparseGPT |", "| down_proj |", "| whole model |"):
        assert name in out, out
