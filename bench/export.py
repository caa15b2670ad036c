"""Benchmark: ``edgeqlora export --target gguf --quant q4_k_m`` against llama.cpp's own path.

Measures wall time and peak RSS (``ru_maxrss`` of each child process, via ``os.wait4``) of

1. ``edgeqlora export ADAPTER --quant q4_k_m --merge-base original --no-parity`` (the whole
   command: merge, GGUF, verification in llama.cpp against the merged model in torch; the parity
   gate, a task evaluation, is left out);
2. our conversion alone on the merged checkpoint: the one-pass Q4_K_M writer (llama.cpp's type
   mix and kernels, ``exporters/gguf/plan.py`` and ``kernels.py``); the figure to hold against llama.cpp's path,
   which starts from the same merged checkpoint. Also our F32 GGUF + llama.cpp's quantizer (the
   route for models the one-pass writer leaves to llama.cpp);
3. llama.cpp's path on the same merged checkpoint: ``convert_hf_to_gguf.py --outtype f32`` from
   the llama-cpp-python source distribution + the same quantizer call (``llama_model_quantize``,
   what the ``llama-quantize`` binary runs; the binary itself is not built by pip);
4. streaming: our F16 writer on a synthetic random Llama written to disk (~0.8 B parameters by
   default), against the size of its largest tensor (goal: peak RSS <= 1.1x that, plus
   buffers) and the RSS of a process that only imports the writer's libraries.

The llama.cpp source is fetched with
``pip download --no-binary :all: llama-cpp-python==<installed version>`` into a scratch folder
under the system temp dir (or pass ``--llama-cpp-src``); nothing is kept.

    python bench/export.py [--adapter runs/x/adapter] [--json bench/results/export.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PY = sys.executable


# Peak RSS is read in a small launcher process: a child forked straight from this (torch-laden)
# process would inherit our RSS high-water mark through fork/exec (Linux keeps the pre-exec
# maximum in ru_maxrss), so every figure would read at least our own size.
_LAUNCHER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
with open(sys.argv[2], "wb") as log:
    rc = subprocess.run(sys.argv[3:], stdout=log, stderr=subprocess.STDOUT).returncode
json.dump({"rc": rc, "wall_s": time.perf_counter() - t,
           "rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss},
          open(sys.argv[1], "w"))
"""


def run(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as d:
        res, log = Path(d) / "res.json", Path(d) / "log.txt"
        subprocess.run([PY, "-c", _LAUNCHER, str(res), str(log), *cmd], cwd=cwd,
                       env={**os.environ, **(env or {})}, check=True)
        r = json.loads(res.read_text())
        if r["rc"] != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({r['rc']}):\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
    return {"wall_s": round(r["wall_s"], 2), "peak_rss_mib": round(r["rss_kib"] / 1024, 1)}


def combine(*runs: dict) -> dict:
    return {"wall_s": round(sum(r["wall_s"] for r in runs), 2),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def llama_cpp_source(scratch: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    from importlib import metadata

    version = metadata.version("llama_cpp_python")
    subprocess.run([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={version}", "-d", str(scratch)], check=True,
                   stdout=subprocess.DEVNULL)
    sdist = next(scratch.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   ("/conversion/" in m.name or "/gguf-py/" in m.name or
                    m.name.endswith("convert_hf_to_gguf.py"))]
        tar.extractall(scratch, members=members, filter="data")
    return next(scratch.glob("llama_cpp_python-*/vendor/llama.cpp"))


def synthetic_adapter(scratch: Path) -> Path:
    """A LoRA (r=16, all linear layers, random B) on the embedded model, with its manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeqlora.artifacts import write_manifest
    from edgeqlora.base import base_fingerprint, resolve_base

    base = resolve_base("embedded")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.005)
    out = scratch / "adapter"
    peft_model.save_pretrained(out)
    fp = base_fingerprint(base)
    write_manifest(out, "adapter", {
        "base": {"spec": "embedded", "path": str(base), "weights_sha256": fp["weights_sha256"],
                 "model_type": fp["model_type"]},
        "quant": {"quant": "nf4", "double_quant": True, "block_size": 64,
                  "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": [], "rslora": False,
                 "dora": False},
        "data": {"spec": "embedded:iot"}, "metrics": {}, "config": {}})
    return out


def synthetic_llama(out: Path, hidden: int, layers: int, intermediate: int) -> dict:
    """Random Llama weights written tensor by tensor (never the whole model in memory)."""
    import numpy as np

    from edgeqlora.artifacts import TOKENIZER_FILES, SafetensorsStreamWriter
    from edgeqlora.base import resolve_base

    heads, kv = hidden // 64, max(1, hidden // 256)
    vocab = 49152
    specs = [("model.embed_tokens.weight", [vocab, hidden])]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", [hidden]),
                  (p + "post_attention_layernorm.weight", [hidden]),
                  (p + "self_attn.q_proj.weight", [hidden, hidden]),
                  (p + "self_attn.k_proj.weight", [kv * 64, hidden]),
                  (p + "self_attn.v_proj.weight", [kv * 64, hidden]),
                  (p + "self_attn.o_proj.weight", [hidden, hidden]),
                  (p + "mlp.gate_proj.weight", [intermediate, hidden]),
                  (p + "mlp.up_proj.weight", [intermediate, hidden]),
                  (p + "mlp.down_proj.weight", [hidden, intermediate])]
    specs.append(("model.norm.weight", [hidden]))
    out.mkdir(parents=True)
    writer = SafetensorsStreamWriter(out / "model.safetensors", specs, "F32")
    rng = np.random.default_rng(0)
    for name, shape in specs:
        data = np.ones(shape, np.float32) if len(shape) == 1 else \
            rng.standard_normal(shape, dtype=np.float32) * 0.02
        writer.write(name, np.ascontiguousarray(data))
    writer.close()
    src = resolve_base("embedded")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=64)
    (out / "config.json").write_text(json.dumps(cfg))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    params = sum(math.prod(s) for _, s in specs)
    largest = max(math.prod(s) for _, s in specs)
    return {"params": params, "largest_tensor_mib": round(largest * 4 / 2**20, 1),
            "hidden": hidden, "layers": layers, "intermediate": intermediate}


def greedy(model_path: Path, prompts: list[list[int]], eos: int, max_new: int = 64,
           lora_path: Path | None = None) -> list[list[int]]:
    """Greedy continuations in llama.cpp (argmax each step, stop at EOS)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                n_ctx=512, n_threads=os.cpu_count() or 1, verbose=False)
    outs = []
    for ids in prompts:
        llm.reset()
        out = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if tok == eos or len(out) >= max_new:
                break
            out.append(int(tok))
        outs.append(out)
    llm.close()
    return outs


def acceptance(adapter: Path, scratch: Path, n_prompts: int = 40) -> dict:
    """The issue's acceptance figures for a trained adapter: F16 / Q8_0 / Q4_K_M GGUF against
    the merged torch model (top-1, KLD, from each export's own verification), task exact match of
    each in llama.cpp beside the trained model's, and adapter-only Q8_0 on the base GGUF vs the
    merged F16 GGUF (greedy answers on held-out prompts)."""
    from transformers import AutoTokenizer

    from edgeqlora.artifacts import read_manifest
    from edgeqlora.export import export_adapter
    from edgeqlora.heldout import heldout_conversations
    from edgeqlora.tasks import iot

    manifest = read_manifest(adapter, kind="adapter")
    res: dict = {"adapter": str(adapter), "trained_metrics": manifest.get("metrics")}
    rows = heldout_conversations(manifest, n_prompts)
    exports = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        out = scratch / f"acc-{quant}"
        t = time.perf_counter()
        m = export_adapter(adapter, out, quant=quant, merge_base="auto", force=True)
        exports[quant] = out / f"model.{quant}.gguf"
        v = m["verification"]
        res[quant] = {"top1": v.get("top1"), "kld": v.get("kld"), "tokens": v.get("tokens"),
                      "tokenization": v.get("tokenization"), "merge": m["merge"],
                      "quant_mix": m["quant_mix"], "seconds": round(time.perf_counter() - t, 1),
                      "size_mib": round(exports[quant].stat().st_size / 2**20, 1)}
    ao = scratch / "acc-adapter-only"
    export_adapter(adapter, ao, quant="f16", merge_base="auto", adapter_only=True,
                   adapter_quant="q8_0", force=True)
    tok = AutoTokenizer.from_pretrained(scratch / "acc-f16")
    prompts, targets = [], []
    for msgs in rows:
        prompt = [m for m in msgs if m["role"] != "assistant"]
        prompts.append(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True
                                               )["input_ids"])
        targets.append(iot.parse_action(msgs[-1]["content"]))
    answers = {q: greedy(p, prompts, tok.eos_token_id) for q, p in exports.items()}
    answers["adapter_only_q8_0"] = greedy(ao / "base.f16.gguf", prompts, tok.eos_token_id,
                                          lora_path=ao / "adapter.q8_0.gguf")
    for name, outs in answers.items():
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        res.setdefault(name, {})["task"] = iot.score(texts, targets)
    same = sum(a == b for a, b in zip(answers["adapter_only_q8_0"], answers["f16"]))
    res["adapter_only_vs_merged_f16_same_greedy"] = f"{same}/{len(prompts)}"
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", help="trained adapter dir (default: a random LoRA on the "
                                      "embedded model)")
    ap.add_argument("--llama-cpp-src", help="llama.cpp source dir with convert_hf_to_gguf.py")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--json", default="bench/results/export.json")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--acceptance", metavar="ADAPTER",
                    help="only measure the acceptance figures of a trained adapter")
    args = ap.parse_args(argv)
    if args.acceptance:
        with tempfile.TemporaryDirectory(prefix="edgeqlora-acceptance-") as d:
            res = acceptance(Path(args.acceptance), Path(d))
        print(json.dumps(res, indent=2, default=str))
        out = Path(args.json).with_name("export_acceptance.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        return 0

    from edgeqlora.merge import merge_adapter

    results: dict = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    scratch = Path(tempfile.mkdtemp(prefix="edgeqlora-bench-export-"))
    env = {"OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false"}
    try:
        adapter = Path(args.adapter) if args.adapter else synthetic_adapter(scratch)
        merged = scratch / "merged"
        merge_adapter(adapter, merged, merge_base="original")
        q_code = ("import sys; from edgeqlora.exporters.gguf import quantize_gguf; "
                  "quantize_gguf(sys.argv[1], sys.argv[2], 'q4_k_m')")
        results["ours_export_command"] = run(
            [PY, "-m", "edgeqlora", "export", str(adapter), "--out", str(scratch / "ours"),
             "--quant", "q4_k_m", "--merge-base", "original", "--no-parity"], env=env)
        w_code = ("import sys; from edgeqlora.exporters.gguf import write_model_gguf; "
                  "write_model_gguf(sys.argv[1], sys.argv[2], sys.argv[3])")
        results["ours_convert_quantize"] = run(
            [PY, "-c", w_code, str(merged), str(scratch / "ours.gguf"), "q4_k_m"], env=env)
        a = run([PY, "-c", w_code, str(merged), str(scratch / "ours.f32.gguf"), "f32"], env=env)
        b = run([PY, "-c", q_code, str(scratch / "ours.f32.gguf"), str(scratch / "ours2.gguf")],
                env=env)
        results["ours_f32_then_llama_cpp_quantizer"] = {**combine(a, b), "convert": a,
                                                        "quantize": b}
        try:
            src = llama_cpp_source(scratch / "src", args.llama_cpp_src)
            a = run([PY, str(src / "convert_hf_to_gguf.py"), str(merged), "--outtype", "f32",
                     "--outfile", str(scratch / "ref.f32.gguf")], cwd=str(src), env=env)
            b = run([PY, "-c", q_code, str(scratch / "ref.f32.gguf"), str(scratch / "ref.gguf")],
                    env=env)
            results["llama_cpp_convert_quantize"] = {**combine(a, b), "convert": a,
                                                     "quantize": b, "source": str(src.parent.name)}
        except Exception as exc:  # report why the comparison could not run, keep the rest
            results["llama_cpp_convert_quantize"] = {"error": str(exc).splitlines()[0]}

        if not args.skip_synthetic:
            syn = scratch / "synthetic"
            info = synthetic_llama(syn, args.hidden, args.layers, args.intermediate)
            imports = run([PY, "-c", "import edgeqlora.exporters.gguf, gguf, safetensors, "
                                     "numpy, tokenizers"], env=env)
            w16 = ("import sys; from edgeqlora.exporters.gguf import write_model_gguf; "
                   "write_model_gguf(sys.argv[1], sys.argv[2], 'f16')")
            conv = run([PY, "-c", w16, str(syn), str(scratch / "syn.f16.gguf")], env=env)
            model_mib = info["params"] * 4 / 2**20
            results["streaming_synthetic"] = {
                **info, "model_fp32_mib": round(model_mib, 1), "ours_f16": conv,
                "import_only_rss_mib": imports["peak_rss_mib"],
                "rss_above_imports_mib": round(conv["peak_rss_mib"] - imports["peak_rss_mib"], 1),
                "peak_rss_vs_largest_tensor": round(conv["peak_rss_mib"]
                                                    / info["largest_tensor_mib"], 2),
                "gguf_mib": round((scratch / "syn.f16.gguf").stat().st_size / 2**20, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = [("edgeqlora export (merge+q4_k_m+verify)", results["ours_export_command"]),
            ("ours: one-pass q4_k_m writer", results["ours_convert_quantize"]),
            ("ours: f32 + llama.cpp quantizer", results["ours_f32_then_llama_cpp_quantizer"]),
            ("llama.cpp: convert_hf_to_gguf f32 + quantize", results["llama_cpp_convert_quantize"])]
    print(f"{'path':<46} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:<46} {'n/a':>8} {'n/a':>13}  ({r['error']})")
        else:
            print(f"{name:<46} {r['wall_s']:>8.1f} {r['peak_rss_mib']:>13.0f}")
    ref = results["llama_cpp_convert_quantize"]
    if "wall_s" in ref:
        ratio = results["ours_convert_quantize"]["wall_s"] / ref["wall_s"]
        results["convert_quantize_wall_ratio"] = round(ratio, 2)
        print(f"ours / llama.cpp, convert + quantize: {ratio:.2f}x wall time (goal <= 0.5x)")
    if "streaming_synthetic" in results:
        s = results["streaming_synthetic"]
        print(f"\nstreaming, synthetic Llama {s['params'] / 1e9:.2f} B params "
              f"({s['model_fp32_mib']:.0f} MiB fp32, largest tensor "
              f"{s['largest_tensor_mib']:.0f} MiB) -> F16 GGUF {s['gguf_mib']:.0f} MiB:")
        f16 = s["ours_f16"]
        print(f"  wall {f16['wall_s']:.1f} s, peak RSS {f16['peak_rss_mib']:.0f}"
              f" MiB = {s['peak_rss_vs_largest_tensor']:.2f}x the largest tensor (goal <= 1.1x); "
              f"{s['rss_above_imports_mib']:.0f} MiB above the {s['import_only_rss_mib']:.0f}"
              " MiB of importing the writer's libraries")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
