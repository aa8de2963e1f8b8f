"""``python -m sparsefast.kernel_report``: the same as ``python -m sparsefast kernels``."""
import sys

from sparsefast.cli.kernels import main as _main

sys.exit(_main(sys.argv[1:]))
