"""Builds lossbank's optional native kernels (lossbank/csrc/native.cpp); metadata is in pyproject.toml.

The kernels need torch's headers at build time, so build with the environment's torch:
``pip install --no-build-isolation -e .``. Without torch in the build environment, or
without a C++ compiler, lossbank installs without them and uses its pure-PyTorch code,
which gives the same results (tests/test_losses.py runs every test on both), only slower at few classes.
"""
from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    # pip shows this only with -v; lossbank itself warns on first use (lossbank.has_native_kernels()).
    print("lossbank: torch is not importable at build time; installing without the native kernels "
          "(install torch first, then pip install --no-build-isolation .)")
else:
    ext_modules = [CppExtension("lossbank._native", ["lossbank/csrc/native.cpp"], extra_compile_args=["-O3"], optional=True)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
