"""What an installation without the margin losses' C++ kernels tells its user.

`pip install .` (with build isolation, torch is not importable at build time) or a missing
compiler installs lossbank without lossbank/_native; pip hides the build's output, so the
library itself has to say so: ``lossbank.has_native_kernels()`` and one warning on first use.
"""
from __future__ import annotations

import subprocess
import sys

import lossbank

# Makes `from . import _native` fail as it does where the extension was never built.
WITHOUT_KERNELS = """
import sys, warnings
sys.modules["lossbank._native"] = None
warnings.simplefilter("always")
import torch, lossbank
print("has_native_kernels", lossbank.has_native_kernels())
features, weight, target = torch.randn(4, 3), torch.randn(2, 3), torch.tensor([0, 1, 0, 1])
with warnings.catch_warnings(record=True) as first:
    lossbank.AMSoftmax()(features, weight, target)
with warnings.catch_warnings(record=True) as later:
    lossbank.ArcFace()(features, weight, target)
    lossbank.LSoftmax()(features, weight, target)
print("first", len(first), first[0].message if first else "")
print("later", len(later))
"""


def test_has_native_kernels_where_built():
    # The suite runs where the kernels are built (README's set-up command); tests/test_losses.py
    # fails loudly otherwise.
    assert lossbank.has_native_kernels() is True


def test_missing_kernels_are_reported_once():
    out = subprocess.run([sys.executable, "-c", WITHOUT_KERNELS], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["has_native_kernels"] == "False"
    assert lines["first"].startswith("1 ")
    assert "C++ kernels" in lines["first"] and "pip install --no-build-isolation" in lines["first"]
    assert lines["later"] == "0", "the warning is given once per process"
