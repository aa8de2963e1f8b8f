import subprocess
import sys

import pytest

import sparsefast.__main__ as cli


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "info"):
        assert cmd in out


def test_info_reports_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in out
    assert "torch" in out


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2


def test_demo_runs_and_checks_against_reference():
    r = subprocess.run([sys.executable, "-m", "sparsefast", "demo", "--steps", "40"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check vs reference" in r.stdout and "-> OK" in r.stdout
    assert "speed (" in r.stdout
    assert "training step" in r.stdout and "speedup dense/sparse" in r.stdout and "training state bytes" in r.stdout


BAD_ARGS = [
    (["demo", "--steps", "-1"], "--steps"),
    (["demo", "--sparsity", "1.5"], "--sparsity"),
    (["demo", "--device", "bogus"], "--device"),
    (["bench", "--dtypes", "float99"], "float99"),
]


@pytest.mark.parametrize("argv,names", BAD_ARGS)
def test_bad_values_give_one_line_and_exit_2(argv, names):
    r = subprocess.run([sys.executable, "-m", "sparsefast", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "error:" in lines[0] and names in lines[0] and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_bad_values_in_process(capsys):
    from sparsefast.cli import bench, demo

    for cmd, argv in ((demo, ["--steps", "0"]), (demo, ["--sparsity", "nan"]), (demo, ["--device", "meta"]),
                      (bench, ["--ops", "matmul"]), (bench, ["--impls", "sf:nope"]), (bench, ["--budget", "0"])):
        assert cmd.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error: argument" in err, (argv, err)


def test_demo_prints_training_step_ratio():
    import torch
    from torch import nn

    from sparsefast.cli import demo
    from sparsefast.nn import sparsify

    def mlp():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    torch.manual_seed(0)
    model = sparsify(mlp(), sparsity=0.9)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    ratio, mem = demo._training_step_comparison(model, mlp, "reference", x, y, torch.device("cpu"), batch=16,
                                                rounds=5, steps=2)
    assert ratio > 0 and 0 < mem < 0.5  # 10 % of the weights: far less training state than dense


def test_bench_runs_a_case_end_to_end(capsys):
    """`python -m sparsefast bench` checks and times a case and prints its row (run_cases / run_case share
    first_call and the Result record; a NameError there once made every bench run crash)."""
    from sparsefast.benchmarking.report import run_case
    from sparsefast.benchmarking.timing import Result, run_cases
    from sparsefast.cli import bench
    from sparsefast.benchmarking.cases import cases

    c = cases("cpu", shapes=["cpu-small"], ops=["linear"], kinds=["fwd"], dtypes=["float32"], patterns=["90%"])[0]
    rs = run_cases(c, ["dense", "sf:reference"], rounds=5, budget_s=0.01, dense_dtypes=False)
    assert {r.impl: r.status for r in rs} == {"dense": "ok", "sf:reference": "ok"}
    assert all(isinstance(r, Result) and r.rounds >= 5 and r.median_s > 0 for r in rs)
    assert run_case(c, "torch-2:4", timed=False).status == "skip"  # GPU 2:4 only: a skip with its reason
    assert bench.main(["--rounds", "5", "--budget", "0.01", "--shapes", "cpu-small", "--ops", "linear",
                       "--kinds", "fwd", "--dtypes", "float32", "--patterns", "90%", "--impls", "dense,sf:reference"]) == 0
    assert "64x1024x1024" in capsys.readouterr().out
