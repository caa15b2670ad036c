"""GGUF importance-matrix quantization (``imatrix``): the matrix itself (one positive row per
block weight, equal to a hand computation), the re-quantization path (llama.cpp's own bytes
without an imatrix, different bytes and a smaller importance-weighted error with one), the export
(same type mix, loads in llama.cpp, recorded in the manifest), the calibration request the export
stage answers, and the bad inputs (one line, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import build_tiny_model, has_module, read_gguf
from lora_fixtures import make_adapter

pytestmark = pytest.mark.skipif(not has_module("llama_cpp"), reason="needs llama-cpp-python")

ROWS = 12  # calibration rows: enough for every column to be seen, fast on two cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose rows are 256 wide, so llama.cpp's Q4_K_M mix really uses K-quants
    (narrower rows fall back to Q5_0/Q8_0)."""
    root = tmp_path_factory.mktemp("imatrix")
    base = build_tiny_model(root / "base", tokenizer_dir, hidden=256, intermediate=512,
                            layers=2, heads=4, kv_heads=2)
    calib = root / "calib.jsonl"
    from edgeqlora.rows import load_dataset

    rows = load_dataset("embedded:iot").rows[:ROWS]
    calib.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return {"root": root, "base": base, "calib": calib}


def _calibration(base: Path, quant: str, options: dict):
    """What the export stage does with the exporter's calibration request: the rows, made by
    ``heldout.calibration_sequences`` with the base's tokenizer."""
    from transformers import AutoTokenizer

    from edgeqlora.exporters import gguf as G
    from edgeqlora.heldout import calibration_sequences

    req = G.calibration_request(quant, options)
    if req is None:
        return None
    return calibration_sequences(AutoTokenizer.from_pretrained(base), req["spec"], req["rows"],
                                 req["max_len"], req["what"], general=req["general"])


@pytest.fixture(scope="module")
def imatrix(tiny):
    """The imatrix on the calibration rows, with the record the export keeps of both."""
    from edgeqlora.exporters.gguf.imatrix import build_imatrix

    seqs, record = _calibration(tiny["base"], "q4_k_m",
                                {"imatrix": str(tiny["calib"]), "imatrix_rows": ROWS})
    im, made = build_imatrix(tiny["base"], seqs)
    return im, {**record, **made}


@pytest.fixture(scope="module")
def exports(tiny):
    """The same Q4_K_M export without and with the imatrix."""
    from edgeqlora.exporters import gguf as G

    out = {}
    for key, im in (("plain", None), ("imatrix", str(tiny["calib"]))):
        d = tiny["root"] / f"q4km-{key}"
        d.mkdir()
        # every option the CLI can pass reaches write_export (calibration_general once did not)
        options = {"imatrix": im, "imatrix_rows": ROWS, "calibration_general": 0.25}
        out[key] = (d, G.write_export(tiny["base"], d, "q4_k_m", **options,
                                      calibration=_calibration(tiny["base"], "q4_k_m",
                                                               options)))
    return out


def _tensors(path: Path) -> dict:
    return {t.name: t for t in read_gguf(path)[1]}


def test_imatrix_rows_match_the_activations(tiny, imatrix):
    """One entry per linear weight of the blocks (not the embedding), in_features long,
    positive; equal to mean(x^2) of the hand-computed input of attn_q in block 0 and shared by
    the weights that read the same input."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeqlora.exporters.gguf.imatrix import MAX_LEN
    from edgeqlora.heldout import GENERAL_SHARE, calibration_sequences

    im, record = imatrix
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert sorted(im) == sorted(f"blk.{i}.{k}.weight" for i in range(2) for k in kinds)
    for name, row in im.items():
        assert row.shape == ((512,) if "ffn_down" in name else (256,)) and row.dtype == np.float32
        assert np.all(row > 0) and np.all(np.isfinite(row)), name
    assert np.array_equal(im["blk.0.attn_q.weight"], im["blk.0.attn_v.weight"])
    assert np.array_equal(im["blk.1.ffn_gate.weight"], im["blk.1.ffn_up.weight"])
    assert not np.allclose(im["blk.0.attn_q.weight"], im["blk.1.attn_q.weight"])
    assert record["rows"] == ROWS and record["tokens"] > 20 * ROWS
    assert record["entries"] == 14 and len(record["sha256"]) == 64

    seqs, _ = calibration_sequences(AutoTokenizer.from_pretrained(tiny["base"]),
                                    str(tiny["calib"]), ROWS, MAX_LEN, general=GENERAL_SHARE)
    assert record["general"]["share"] == pytest.approx(GENERAL_SHARE, abs=0.02)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    with torch.no_grad():
        xs = [model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(s)))
              for s in seqs]
    x = torch.cat(xs).double()
    expected = (x * x).mean(0).numpy()
    # float64 accumulation on both sides; float32 storage: rtol 1e-5.
    np.testing.assert_allclose(im["blk.0.attn_q.weight"], expected, rtol=1e-5)


def test_without_imatrix_the_kernel_gives_llama_cpps_bytes(tiny):
    """ggml_quantize_chunk with no imatrix reproduces llama_model_quantize's bytes for every
    block tensor: the re-quantization path is llama.cpp's own."""
    import numpy as np

    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.gguf.imatrix import IMATRIX_TYPES
    from edgeqlora.exporters.gguf.kernels import quantize_rows

    f32 = tiny["root"] / "tiny.f32.gguf"
    G.write_model_gguf(tiny["base"], f32, "f32")
    src = _tensors(f32)
    ref = tiny["root"] / "tiny.llama-cpp.q4_k_m.gguf"
    G.quantize_gguf(f32, ref, "q4_k_m")  # llama.cpp's quantizer, not our writer
    checked = 0
    for name, t in _tensors(ref).items():
        if name.startswith("blk.") and t.tensor_type.name in IMATRIX_TYPES:
            data = np.asarray(src[name].data, dtype=np.float32).reshape(-1, int(t.shape[0]))
            q = quantize_rows(data, t.tensor_type)
            assert np.array_equal(q.reshape(-1), np.asarray(t.data).reshape(-1)), name
            checked += 1
    assert checked == 14


def test_imatrix_export_same_mix_other_bytes_loads(tiny, exports, imatrix):
    import numpy as np
    from llama_cpp import Llama

    (d0, plain), (d1, withim) = exports["plain"], exports["imatrix"]
    assert plain["quant_mix"] == withim["quant_mix"] and "Q4_K" in plain["quant_mix"]
    assert "imatrix" not in plain
    rec = withim["imatrix"]
    assert rec["used"] and rec["rows"] == ROWS and rec["sha256"] == imatrix[1]["sha256"]
    assert rec["requantized"] == 14 and rec["without_imatrix"] == ["token_embd.weight"]
    t0, t1 = _tensors(d0 / plain["model_file"]), _tensors(d1 / withim["model_file"])
    assert list(t0) == list(t1)
    for name in t0:
        assert t0[name].tensor_type == t1[name].tensor_type and \
            list(t0[name].shape) == list(t1[name].shape)
        same = np.array_equal(np.asarray(t0[name].data), np.asarray(t1[name].data))
        assert same == (not name.startswith("blk.") or name.endswith("_norm.weight")), name
    llm = Llama(model_path=str(d1 / withim["model_file"]), n_ctx=64, logits_all=True,
                verbose=False, n_threads=2)
    try:
        llm.eval([1, 200, 300, 400])
        assert np.all(np.isfinite(np.array(llm.scores[:4])))
    finally:
        llm.close()


def test_imatrix_lowers_the_importance_weighted_error(tiny, exports, imatrix):
    """What imatrix quantization optimises: sum_j imatrix_j (W_ij - Q_ij)^2. Per tensor of the
    export, and on a random matrix with strongly uneven importances (a wide margin)."""
    import gguf
    import numpy as np

    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.gguf.kernels import quantize_rows

    im = imatrix[0]
    f32 = tiny["root"] / "tiny.f32.gguf"
    if not f32.exists():
        G.write_model_gguf(tiny["base"], f32, "f32")
    src = _tensors(f32)
    (d0, plain), (d1, withim) = exports["plain"], exports["imatrix"]
    t0, t1 = _tensors(d0 / plain["model_file"]), _tensors(d1 / withim["model_file"])
    better = 0
    for name, row in im.items():
        w = np.asarray(src[name].data, dtype=np.float32).reshape(-1, row.shape[0])
        err = {}
        for key, t in (("plain", t0[name]), ("imatrix", t1[name])):
            deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
            err[key] = float((row * (w - deq) ** 2).sum())
        better += err["imatrix"] < err["plain"]
    assert better == len(im)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    row = np.exp(rng.normal(0, 2, 256)).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    for qtype in (Q.Q4_K, Q.Q3_K, Q.Q6_K, Q.Q4_0):
        errs = [float((row * (w - gguf.quants.dequantize(quantize_rows(w, qtype, r), qtype)
                                .reshape(w.shape)) ** 2).sum()) for r in (None, row)]
        assert errs[1] < 0.8 * errs[0], (qtype.name, errs)


def test_imatrix_ignored_for_types_that_do_not_use_one(tiny, tmp_path):
    from edgeqlora.exporters import gguf as G

    options = {"imatrix": str(tiny["calib"])}
    assert G.calibration_request("f16", options) is None  # no rows to make for F16
    info = G.write_export(tiny["base"], tmp_path, "f16", **options)
    assert info["imatrix"]["used"] is False and "f16 does not use" in info["imatrix"]["note"]
    assert info["imatrix"]["source"] == str(tiny["calib"])
    assert info["quant_mix"] == {"F32": 5, "F16": 15}


def test_calibration_request_and_auto(tiny, tmp_path):
    """The exporter asks for calibration rows only where an imatrix changes the file; ``auto``
    is passed on for the export stage to turn into the adapter's training data. Without the
    rows, an imatrix export is refused before anything is written."""
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters import gguf as G
    from edgeqlora.exporters.gguf.imatrix import DEFAULT_ROWS, MAX_LEN

    want = {"spec": "auto", "rows": DEFAULT_ROWS, "max_len": MAX_LEN, "general": 0.25,
            "what": "imatrix calibration data"}
    assert G.calibration_request("q4_k_m", {"imatrix": "auto"}) == want
    assert G.calibration_request("Q4_0", {"imatrix": "AUTO", "imatrix_rows": 7}) == \
        {**want, "rows": 7}
    assert G.calibration_request("q6_k", {"imatrix": str(tiny["calib"])})["spec"] == \
        str(tiny["calib"])
    for quant, options in (("q4_k_m", {}), ("q4_k_m", {"imatrix": "none"}),
                           ("q8_0", {"imatrix": "auto"})):
        assert G.calibration_request(quant, options) is None
    with pytest.raises(ConfigError, match="imatrix=auto"):
        G.write_export(tiny["base"], tmp_path, "q4_k_m", imatrix="auto")
    assert list(tmp_path.iterdir()) == []


def test_check_options_names_every_problem(tiny):
    from edgeqlora.errors import ConfigError
    from edgeqlora.exporters import gguf as G

    assert G.check_options({}) == G.DEFAULT_OPTIONS
    assert G.check_options({"imatrix": " Auto ", "name": "m"}) == \
        {**G.DEFAULT_OPTIONS, "imatrix": "auto", "name": "m"}
    with pytest.raises(ConfigError) as err:
        G.check_options({"imatrx": "auto", "block_size": 32, "imatrix_rows": 0, "name": "a/b"})
    msg = str(err.value)
    for part in ("'imatrx' (did you mean 'imatrix'?", "'block_size'", "imatrix_rows=0",
                 "name='a/b'", "valid: imatrix, imatrix_rows, calibration_general, name"):
        assert part in msg, msg


def test_bad_calibration_data_writes_nothing(tiny, tmp_path):
    """A missing path is refused by the option check, before any work; bad rows fail where the
    export stage makes them from the request, named as imatrix calibration data."""
    from edgeqlora.errors import DataError, InputError
    from edgeqlora.exporters import gguf as G

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="imatrix='.*nope.jsonl': no such file"):
        G.write_export(tiny["base"], out, "q4_k_m", imatrix=str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="nope.jsonl': no such file"):
        G.calibration_request("q4_k_m", {"imatrix": str(tmp_path / "nope.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n{"bar": 2}\n')
    with pytest.raises(DataError, match="imatrix calibration data .*bad.jsonl.*no usable rows"):
        _calibration(tiny["base"], "q4_k_m", {"imatrix": str(bad)})
    assert list(out.iterdir()) == [] and not list(tmp_path.glob(".f32-*"))


def test_cli_imatrix_bad_path_one_line(tiny, tmp_path, capsys):
    from edgeqlora.cli import main

    adapter = make_adapter(tmp_path / "adapter", tiny["base"])
    out = tmp_path / "out"
    rc = main(["export", str(adapter), "export.eval_tokens=64", "--out", str(out),
               "--quant", "q4_k_m", "--merge-base", "original", "--no-parity",
               "--imatrix", str(tmp_path / "missing.jsonl")])
    # stderr also holds transformers' weight-loading bar from the merge: one error line.
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert rc == 2 and len(errors) == 1 and "missing.jsonl" in errors[0], errors
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    shutil.rmtree(adapter)


def test_every_option_is_a_write_export_parameter():
    """The export stage passes the checked options to ``write_export`` as keywords: an option
    it does not take is a TypeError at the end of a merge (``calibration_general`` once was)."""
    import inspect

    from edgeqlora.exporters import gguf as G

    assert set(G.DEFAULT_OPTIONS) <= set(inspect.signature(G.write_export).parameters)
