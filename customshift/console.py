"""What the command line shows: our own messages and progress bars; the libraries' only with ``--verbose``.

Without it a first run printed three library warnings before anything of ours (torchvision absent, twice;
a deprecated argument name) and the loaders' own progress bars. Errors still surface: they are ours
(customshift/errors.py), or exceptions that the CLI turns into one ``error:`` line. Importing diffusers
or transformers here would make ``--help`` slow, so their verbosity goes through their environment
variables and their loading bars are turned off when a pipeline is loaded (``quiet_loading_bars``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_LIBRARIES = ("diffusers", "transformers", "accelerate", "peft", "torch", "PIL", "safetensors", "huggingface_hub")
_quiet = False


def configure_console(verbose: bool = False) -> None:
    """Quiet the libraries' warnings, logs and loading bars unless ``verbose`` (downloads keep their bars)."""
    global _quiet
    _quiet = not verbose
    if verbose:
        logging.getLogger("customshift").setLevel(logging.INFO)
        return
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"customshift(\.|$)")
    for name in _LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    quiet_loading_bars()


def quiet_loading_bars() -> None:
    """Turn off the loaders' bars ("Loading pipeline components", "Loading weights") in quiet mode."""
    if not _quiet:
        return
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.set_verbosity_error()
            module.disable_progress_bar()
