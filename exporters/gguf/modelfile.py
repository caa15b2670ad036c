"""The Ollama Modelfile written beside a GGUF export.

The chat template is rendered with ``runtimes.chat_template`` (sandboxed Jinja, as transformers
renders it, torch-free) from the checkpoint's tokenizer files, read as the GGUF runtime reads an
export directory's (``runtimes.gguf.read_tokenizer_files``).
"""

from __future__ import annotations

from pathlib import Path


def modelfile(model_dir: Path, gguf_name: str, adapter_name: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template as a Go template when it is a
    ChatML template (rendered from the HF template to find its default system prompt), and the
    stop tokens. Other templates are left to Ollama, which reads tokenizer.chat_template."""
    from edgeqlora.runtimes.chat_template import ChatTemplate
    from edgeqlora.runtimes.gguf import read_tokenizer_files

    tok = read_tokenizer_files(Path(model_dir))
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    template = tok.get("chat_template") or ""
    stops = []
    if "<|im_start|>" in template:
        probe = ChatTemplate(template, tok, tok.get("chat_template_origin", "chat template")
                             ).render([{"role": "user", "content": "\x00"}],
                                      add_generation_prompt=True)
        head = "<|im_start|>system\n"
        default_system = probe[len(head):probe.index("<|im_end|>")] \
            if probe.startswith(head) else ""
        lines.append('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n'
                     '{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}'
                     '<|im_end|>\n{{ end }}<|im_start|>assistant\n"""')
        if default_system:
            lines.append(f'SYSTEM """{default_system}"""')
        stops.append("<|im_end|>")
    else:
        lines.append("# TEMPLATE: not a ChatML template; Ollama uses the GGUF's "
                     "tokenizer.chat_template")
    eos = tok.get("eos_token")
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
