"""edgeqlora.hf_tokenizer: a base's tokenizer loaded once per content of its files."""

from __future__ import annotations

import shutil


def test_same_files_share_one_tokenizer_and_changed_files_load_again(tokenizer_dir, tmp_path):
    from edgeqlora.hf_tokenizer import load

    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    first = load(tokenizer_dir)
    assert load(copy) is first  # the same content elsewhere: the same object
    assert first("lamp on")["input_ids"] == load(tokenizer_dir)("lamp on")["input_ids"]

    template = copy / "chat_template.jinja"
    template.write_text(template.read_text() + "{# changed #}")
    changed = load(copy)
    assert changed is not first and "{# changed #}" in changed.chat_template
    assert load(tokenizer_dir) is first
