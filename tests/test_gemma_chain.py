"""Gemma 3 270M through every stage (slow; skipped, naming the install command, unless the Gemma
packages are installed): QLoRA 2 steps on the real checkpoint -> GGUF Q8_0 export verified
through llama.cpp, with the parity gate against the trained model -> the runtime renders
Gemma's turn format to the ids training saw."""

from __future__ import annotations

import importlib.util

import pytest

from edgeqlora import base, base_gemma

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_export(tmp_path_factory):
    """(adapter dir, manifest, export dir) of a 2-step QLoRA run exported to Q8_0."""
    if importlib.util.find_spec(base_gemma.GEMMA3_PACKAGE) is None:
        pytest.skip(f"Gemma 3 270M is installed on request only: {base_gemma.INSTALL_HINT}")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("bitsandbytes")
    from edgeqlora import train as train_mod
    from edgeqlora.config import build_config
    from edgeqlora.export import export_adapter
    from edgeqlora.tasks import iot

    root = tmp_path_factory.mktemp("gemma-chain")
    rows, _ = iot.generate(seed=0, n_train=16, n_eval=4)
    data = iot.write_jsonl(rows, root / "train.jsonl")
    cfg = build_config({"base": base_gemma.GEMMA3, "data": str(data), "max_steps": 2,
                        "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "max_len": 128,
                        "save_every": 0, "eval_examples": 0, "quant_report_tokens": 0,
                        "lora.r": 4, "parity.eval_examples": 6, "parity.text_tokens": 256})
    adapter = train_mod.train(cfg, root / "run")
    out = root / "q8"
    manifest = export_adapter(adapter, out, quant="q8_0", eval_tokens=256, parity=True, cfg=cfg)
    return adapter, manifest, out


def test_q8_0_export_verified_and_gated(gemma_export):
    import gguf

    _, m, out = gemma_export
    check = m["verification"]
    assert check["passed"], check["problems"]
    assert check["tokenization"]["mismatches"] == []
    # Q8_0 of the 80-step adapter measured top-1 0.985, KLD 0.0019 against the merged model.
    assert check["top1"] >= 0.9 and check["kld"] < 0.05
    assert m["parity"]["passed"], m["parity"]["failures"]
    reader = gguf.GGUFReader(str(out / "model.q8_0.gguf"))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.endswith(("tokens", "scores", "token_type"))}
    assert fields["general.architecture"] == "gemma3"
    assert fields["tokenizer.ggml.model"] == "llama" and fields["general.license"] == "gemma"
    assert fields["tokenizer.chat_template"] == base_gemma.CHAT_TEMPLATE.read_text()
    assert not (out / "source_metadata.json").exists()  # the GGUF holds its vocabulary


def test_runtime_renders_gemma_turns_as_training(gemma_export):
    """The chat template the GGUF carries, rendered by the torch-free runtime, gives the ids
    transformers gave the trainer (Gemma's <bos> from the template, not a second one)."""
    from transformers import AutoTokenizer

    from edgeqlora.runtimes import load

    _, _, out = gemma_export
    messages = [{"role": "system", "content": "You control a smart home."},
                {"role": "user", "content": "Turn on the kitchen light"}]
    tok = AutoTokenizer.from_pretrained(base.resolve_base(base_gemma.GEMMA3))
    want = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    with load(out) as runtime:
        got = runtime.chat_ids(messages)
    assert got == want
    assert got.count(2) == 1  # one <bos>
