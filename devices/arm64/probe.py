#!/usr/bin/env python3
"""Load exports with ``edgeqlora.runtimes.load`` and record logits and greedy answers.

Runs unchanged on both sides of an arm64-vs-x86 comparison (``arm64.py compare``): on the host
with the project's venv, and on the arm64 Debian userland under qemu, where only numpy, jinja2,
tokenizers, onnxruntime and llama-cpp-python are installed and edgeqlora is not. There the
runtime shims are imported straight from this checkout, mapped the way ``pyproject.toml``'s
``[tool.setuptools.package-dir]`` maps them when installed (``edgeqlora.runtimes`` ->
``runtimes/``), so the code under test is the code in the repository.

    python probe.py JOB.json OUT_DIR

JOB.json: ``{"exports": [dir, ...], "prompts": [{"messages": [...], "answer": "..."}],
"max_new_tokens": 16, "n_threads": 1}``. For each export and prompt it writes the teacher-forced
logits of the conversation with its answer (``OUT_DIR/<export #>-<prompt #>.npy``, float32
``[tokens, vocab]``) and the greedy answer to the prompt alone; ``OUT_DIR/result.json`` holds the
token ids, answers, timings and what the runtime ran on.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def import_runtimes():
    """``edgeqlora.runtimes``: the installed one, else this checkout's ``runtimes/``."""
    try:
        from edgeqlora import runtimes

        return runtimes
    except ImportError:
        pass
    import tomllib  # Python 3.11+, which the arm64 side (bookworm) has

    sys.path.insert(0, str(REPO))
    import edgeqlora  # errors, artifacts: torch-free

    table = tomllib.loads((REPO / "pyproject.toml").read_text())
    folder = table["tool"]["setuptools"]["package-dir"]["edgeqlora.runtimes"]
    spec = importlib.util.spec_from_file_location(
        "edgeqlora.runtimes", REPO / folder / "__init__.py",
        submodule_search_locations=[str(REPO / folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["edgeqlora.runtimes"] = module
    spec.loader.exec_module(module)
    edgeqlora.runtimes = module  # so that "from edgeqlora import runtimes" works from here on
    return module


def backend_info(rt) -> dict:
    info = {"runtime": rt.name}
    if rt.name == "gguf":
        import llama_cpp

        info["llama_cpp"] = llama_cpp.__version__
        info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    elif rt.name == "onnx":
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    return info


def run(job: dict, out: Path) -> dict:
    import numpy as np

    runtimes = import_runtimes()
    from edgeqlora.runtimes.base import Completion

    result = {"machine": platform.machine(), "python": platform.python_version(),
              "numpy": np.__version__, "exports": []}
    for e, export in enumerate(job["exports"]):
        t0 = time.perf_counter()
        rt = runtimes.load(export, n_threads=int(job.get("n_threads", 1)))
        entry = {"export": export, **backend_info(rt), "vocab_size": rt.vocab_size,
                 "load_s": round(time.perf_counter() - t0, 2), "prompts": []}
        logits_s = gen_s = 0.0
        n_logits = n_gen = 0
        for p, prompt in enumerate(job["prompts"]):
            messages = prompt["messages"]
            full = [*messages, {"role": "assistant", "content": prompt["answer"]}]
            ids = rt.chat_ids(full, add_generation_prompt=False)
            t1 = time.perf_counter()
            logits = rt.logits(ids)
            logits_s += time.perf_counter() - t1
            n_logits += len(ids)
            name = f"{e}-{p}.npy"
            np.save(out / name, np.asarray(logits, dtype=np.float32))
            prompt_ids = rt.chat_ids(messages, add_generation_prompt=True)
            done = Completion()
            t1 = time.perf_counter()
            text = "".join(rt.complete(prompt_ids, max_new_tokens=int(job["max_new_tokens"]),
                                       temperature=0.0, result=done))
            gen_s += time.perf_counter() - t1
            n_gen += done.completion_tokens
            entry["prompts"].append({"ids": ids, "logits": name, "prompt_ids": prompt_ids,
                                     "answer": text, "answer_ids": done.token_ids,
                                     "finish_reason": done.finish_reason})
        rt.close()
        entry.update(logits_s=round(logits_s, 2), logits_tokens=n_logits,
                     generate_s=round(gen_s, 2), generated_tokens=n_gen)
        result["exports"].append(entry)
        print(f"[probe {platform.machine()}] {export}: {n_logits} tokens of logits in "
              f"{logits_s:.1f}s, {n_gen} generated in {gen_s:.1f}s", file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = run(job, out)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
