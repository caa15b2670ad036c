"""bitsandbytes is imported through ``bnb_import.quiet_bnb_import``: quietly, and with the
``torch.compile`` it applies to a few kernels at import deferred to their first call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgeqlora.bnb_import import _compile_on_first_call


def test_compile_waits_for_the_first_call():
    calls = []

    def compile_(fn, **kwargs):
        calls.append(kwargs)
        return lambda *a: ("compiled", fn(*a))

    deferred = _compile_on_first_call(compile_)
    plus_one = deferred(lambda x: x + 1, dynamic=False)
    assert calls == []
    assert plus_one(1) == ("compiled", 2)
    assert plus_one(2) == ("compiled", 3)
    assert calls == [{"dynamic": False}]  # compiled once


def test_compile_as_a_decorator_keeps_the_name():
    calls = []
    deferred = _compile_on_first_call(lambda fn, **kw: calls.append(kw) or fn)

    @deferred(dynamic=False)
    def double(x):
        return 2 * x

    assert double.__name__ == "double" and calls == []
    assert double(4) == 8 and calls == [{"dynamic": False}]


def test_import_puts_torch_compile_back_and_skips_inductor():
    pytest.importorskip("bitsandbytes")
    code = ("import sys, torch; c = torch.compile; "
            "from edgeqlora.bnb_import import quiet_bnb_import; quiet_bnb_import(); "
            "import bitsandbytes.functional as F; "
            "q, s = F.quantize_4bit(torch.randn(64, 64), quant_type='nf4'); "
            "F.dequantize_4bit(q, s); "
            "print(torch.compile is c, 'torch._inductor.compile_fx' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False"]
