"""bitsandbytes is imported through ``bnb_import.quiet_bnb_import``: quietly, and with the
``torch.compile`` it applies to a few kernels at import deferred to their first call."""

from __future__ import annotations

import os
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


def _fake_kernels(root, marker):
    """A ``kernels`` package whose ``get_kernel`` records that it was asked (a hub fetch)."""
    pkg = root / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "def get_kernel(repo, **kw):\n"
        f"    open({str(marker)!r}, 'a').write(repo + '\\n')\n"
        "    raise RuntimeError('no hub here')\n")


def test_no_hub_kernels_hides_the_kernels_package(tmp_path, monkeypatch):
    import importlib

    from edgeqlora.errors import no_hub_kernels

    _fake_kernels(tmp_path, tmp_path / "asked")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with no_hub_kernels():
        with pytest.raises(ImportError):
            importlib.import_module("kernels")
    assert "kernels" not in sys.modules  # put back as it was: never imported
    fake = importlib.import_module("kernels")
    assert fake.__file__.startswith(str(tmp_path))
    with no_hub_kernels():
        pass
    assert sys.modules["kernels"] is fake  # an imported one is put back too


def test_bitsandbytes_never_asks_the_hub_for_a_kernel(tmp_path):
    """On an AVX512-BF16 CPU bitsandbytes' import calls ``kernels.get_kernel`` (a download from
    the Hugging Face hub) unless the toolkit's import route hides ``kernels``: every way the
    toolkit reaches bitsandbytes goes through it (here ``guard_cpu_4bit``, the first the
    trainer meets on a device-aware base)."""
    pytest.importorskip("bitsandbytes")
    marker = tmp_path / "asked"
    _fake_kernels(tmp_path, marker)
    code = ("import sys, torch; from edgeqlora import qlora; "
            "qlora.guard_cpu_4bit(torch.nn.Linear(2, 2)); "
            "print('bitsandbytes' in sys.modules, 'kernels' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    assert run.stdout.split() == ["True", "False"]
    assert not marker.exists(), marker.read_text()
    assert "kernels-community" not in run.stderr
