"""The README's Python example runs as written."""
import re
import warnings
from pathlib import Path


def test_readme_python_blocks_run():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for code in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(code, "README.md", "exec"), {})
