"""The committed tokenizer files (``tests/assets/smollm2-tokenizer``, the ``tokenizer_dir``
fixture) are what the embedded conversion writes, so tiny-model tests tokenize exactly as the
real model does without converting it.

When the conversion changes (edgeqlora.base, or a transformers release that writes these files
differently), this test fails; refresh the files with ``.venv/bin/python tests/test_assets.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import TOKENIZER_ASSETS, TOKENIZER_FILES

# generation_config.json records the transformers version that wrote it; nothing reads it back.
VOLATILE_KEYS = {"generation_config.json": ("transformers_version",)}


def _content(path: Path):
    drop = VOLATILE_KEYS.get(path.name)
    if drop is None:
        return path.read_bytes()
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if k not in drop}


@pytest.mark.slow
def test_committed_tokenizer_files_match_the_embedded_conversion(embedded_dir, tokenizer_dir):
    written = sorted(n for n in TOKENIZER_FILES if (embedded_dir / n).is_file())
    committed = sorted(p.name for p in tokenizer_dir.iterdir())
    assert committed == written, "refresh with: .venv/bin/python tests/test_assets.py"
    for name in written:
        assert _content(tokenizer_dir / name) == _content(embedded_dir / name), (
            f"{tokenizer_dir / name} differs from the conversion's {embedded_dir / name}; "
            "refresh with: .venv/bin/python tests/test_assets.py")


def refresh() -> None:
    """Copy the embedded conversion's tokenizer files into tests/assets (converts if needed)."""
    from edgeqlora.base import resolve_base

    src = resolve_base("embedded")
    shutil.rmtree(TOKENIZER_ASSETS, ignore_errors=True)
    TOKENIZER_ASSETS.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, TOKENIZER_ASSETS / name)
            print(f"{TOKENIZER_ASSETS / name}: {(src / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    refresh()
