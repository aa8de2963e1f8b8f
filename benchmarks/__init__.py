"""pytest-benchmark suites (run as ``pytest benchmarks``); see README.md."""
