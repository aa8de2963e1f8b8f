import subprocess
import sys

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
