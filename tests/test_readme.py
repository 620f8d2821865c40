"""The README's python snippets run exactly as written (their own asserts check what they compute)."""

import re
from pathlib import Path

import pytest
import torch

import stn.transformer  # noqa: F401  (torchvision is imported here, not timed in the snippet)

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index):
    torch.manual_seed(index)
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), namespace)
    if "energy" in namespace:  # the TPS snippet: moved control points bend, the identity does not
        assert namespace["energy"].shape == (2,) and bool((namespace["energy"] > 0).all())
        assert namespace["warped"].shape == namespace["image"].shape
    if "logits" in namespace:  # the SpatialTransformer snippet
        assert namespace["logits"].shape == (4, 10)
