"""Packaging: the namespace mapping works, and the device side never imports torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("cwd", [ROOT, Path("/")], ids=["repo-root", "elsewhere"])
def test_import_is_torch_free(cwd):
    code = (
        "import sys, edgeqlora, edgeqlora.runtimes, edgeqlora.exporters, edgeqlora.devices, "
        "edgeqlora.config, edgeqlora.cli, edgeqlora.artifacts\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(edgeqlora.runtimes.__name__)\n"
    )
    proc = _run(code, cwd)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "edgeqlora.runtimes"


def test_help_is_torch_free():
    code = (
        "import sys\nfrom edgeqlora.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = _run(code, ROOT)
    assert proc.returncode == 0, proc.stderr


def test_wheel_maps_namespaces(tmp_path):
    """A built wheel holds exporters/runtimes/devices under edgeqlora/, not top-level."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("edgeqlora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("runtimes", "exporters", "devices"):
        assert f"edgeqlora/{pkg}/__init__.py" in names
        assert not any(n.startswith(f"{pkg}/") for n in names)
    top = {n.split("/")[0] for n in names}
    assert top <= {"edgeqlora", next(n.split("/")[0] for n in names if ".dist-info" in n)}


DEVICE_GGUF_MODULES = ("numpy", "yaml", "jinja2", "markupsafe", "filelock", "rich", "pygments",
                       "markdown_it", "mdurl", "llama_cpp", "diskcache", "typing_extensions")


def test_device_install_has_no_torch(tmp_path):
    """What the `device-gguf` extra installs (core deps + llama-cpp-python) is enough to import
    edgeqlora and its runtimes, with torch and transformers not importable at all."""
    import importlib.util
    import os

    site = tmp_path / "site"
    pkg = site / "edgeqlora"
    pkg.mkdir(parents=True)
    # Lay the package out as a wheel does (runtimes/exporters/devices under edgeqlora/).
    for item in (ROOT / "edgeqlora").iterdir():
        (pkg / item.name).symlink_to(item)
    for sub in ("runtimes", "exporters", "devices"):
        (pkg / sub).symlink_to(ROOT / sub)
    for name in DEVICE_GGUF_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        origin = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations \
            else Path(spec.origin)
        (site / origin.name).symlink_to(origin)
    code = (
        "import sys, edgeqlora, edgeqlora.runtimes, edgeqlora.cli\n"
        "for heavy in ('torch', 'transformers'):\n"
        "    try:\n        __import__(heavy)\n    except ImportError:\n        pass\n"
        "    else:\n        raise SystemExit(heavy + ' is importable')\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONPATH"] = str(site)
    # -S: no site-packages, -I would drop PYTHONPATH; run from an empty folder.
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
