"""Typed errors for users.

Every failure a user can cause (a wrong path, a corrupt file, a bad config key, an adapter for
another base...) is raised as one of these. The CLI prints ``str(error)`` on one line and exits
with ``error.exit_code``; ``--debug`` shows the traceback. Messages name the file, key or tensor,
the value found, and what to do.
"""

from __future__ import annotations

import contextlib
import sys


class EdgeQloraError(Exception):
    """Base class: an error whose message is meant for the user."""

    exit_code = 2


class ConfigError(EdgeQloraError):
    """One or more config problems, reported together (torchtune style)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class InputError(EdgeQloraError):
    """A file, directory or dataset given by the user cannot be used."""


class DataError(InputError):
    """A dataset with no usable rows, or rows in an unknown format."""


class ManifestError(InputError):
    """A stage's input directory has a missing or mismatching manifest."""


class MissingDependencyError(EdgeQloraError):
    """An optional package is needed; the message says how to install it."""


class TrainingError(EdgeQloraError):
    """Training stopped (non-finite loss, ...); the last good checkpoint is kept."""

    exit_code = 1


class ExportError(EdgeQloraError):
    """An export could not be written or failed its own validation."""

    exit_code = 1


class DiskFullError(ExportError):
    """No space left while writing an export: exit 2 like every full disk (``cli.main``), the
    machine's problem, not the model's; nothing was kept."""

    exit_code = 2


class ParityError(EdgeQloraError):
    """A candidate export is beyond the parity thresholds."""

    exit_code = 1


class DeviceError(EdgeQloraError):
    """A device profile is invalid, or a model does not fit a device."""


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise a MissingDependencyError naming the install command."""
    import importlib

    try:
        if module.partition(".")[0] == "bitsandbytes":
            with no_hub_kernels():
                return importlib.import_module(module)
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}' ({exc}); "
            f"install it with: pip install 'edgeqlora[{extra}]'"
        ) from None


@contextlib.contextmanager
def no_hub_kernels():
    """While inside, ``import kernels`` fails. On a CPU with AVX512-BF16, bitsandbytes' import
    asks the ``kernels`` package (installed with transformers) for a compiled kernel from the
    Hugging Face hub (``kernels-community/quantization-bitsandbytes``): a download of code behind
    the user's back, which this toolkit never makes. Without ``kernels`` bitsandbytes keeps its
    own CPU kernels, the path ``qlora.guard_cpu_4bit`` uses anyway. ``require`` imports
    bitsandbytes inside it."""
    had, before = "kernels" in sys.modules, sys.modules.get("kernels")
    sys.modules["kernels"] = None  # the import system's "not importable" mark
    try:
        yield
    finally:
        if had:
            sys.modules["kernels"] = before
        else:
            sys.modules.pop("kernels", None)
