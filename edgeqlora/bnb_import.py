"""bitsandbytes, imported once, quietly and without paying for ``torch.compile`` at import."""

from __future__ import annotations

import functools


def quiet_bnb_import(required: bool = True,
                     purpose: str = "a quantized base (quant=nf4, fp4 or int8)") -> None:
    """Import bitsandbytes without its CPU-backend warning that the hub kernel it asks the
    ``kernels`` package for (a faster AVX512 inference kernel) could not be had: ``require``
    hides ``kernels`` so that nothing is fetched, and that kernel is exactly the repack path
    ``guard_cpu_4bit`` turns off, so the warning would only confuse.

    bitsandbytes wraps four of its default-backend kernels in ``torch.compile`` when it is
    imported, and each ``torch.compile`` call sets up the inductor compiler (about 1 s on 2
    cores, in every command that imports bitsandbytes), although those kernels are fallbacks
    that the CPU and CUDA backends replace with their own. During the import ``torch.compile``
    is replaced by ``_compile_on_first_call``: the same compile, done if and when a wrapped
    kernel is first called."""
    import logging
    import sys

    from .errors import require

    if "bitsandbytes" in sys.modules:
        return
    if not required:  # before peft, which imports bitsandbytes whenever it is installed
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            return
    import torch

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level, compile_ = logger.level, torch.compile
    logger.setLevel(logging.ERROR)
    torch.compile = _compile_on_first_call(compile_)
    try:
        require("bitsandbytes", "train", purpose)  # never fetching hub kernels: see require
    finally:
        torch.compile = compile_
        logger.setLevel(level)


def _compile_on_first_call(compile_):
    """``torch.compile`` with the compile (and the ``torch._dynamo`` import) deferred to the
    first call of the compiled function."""
    def deferred(model=None, **kwargs):
        if model is None:  # used as @torch.compile(**kwargs)
            return lambda fn: deferred(fn, **kwargs)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:
                compiled.append(compile_(model, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return deferred
