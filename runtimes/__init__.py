"""Runtime shims (installed as ``edgeqlora.runtimes``): load an export dir and run it.

Device side: numpy, jinja2 and one runtime only. Never imports torch, transformers or peft.
"""
