"""The harness: datasets, backbones, feature cache, training and reports for comparing lossbank losses.

It needs the ``eval`` extra; a missing package of it is reported as what to install.
"""
import importlib.util
import sys

# The eval extra's packages, by import name: checked here, so that a missing one is reported
# as what to install instead of as an ImportError from deep inside the harness.
_EVAL_MODULES = ("PIL", "yaml", "tqdm", "torchvision", "pandas", "matplotlib", "scipy", "sklearn", "optuna", "timm")
_missing = [name for name in _EVAL_MODULES if importlib.util.find_spec(name) is None]
if _missing:
    _message = (f"the lossbank harness (evaluation) needs the 'eval' extra, and {', '.join(_missing)} "
                f"{'is' if len(_missing) == 1 else 'are'} not installed: pip install 'lossbank[eval]' "
                f"(from a checkout: pip install --no-build-isolation -e '.[eval]')")
    if sys.argv[:1] == ["-m"]:  # `python -m evaluation.xxx` is starting: one line, no traceback
        sys.exit(f"error: {_message}")
    raise ModuleNotFoundError(_message, name=_missing[0])
