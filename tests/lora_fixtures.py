"""Test adapters: PEFT LoRA on a tiny base with random non-zero A and B (so a merge changes the
model), saved with a manifest following the trainer's schema. Used by the merge and export tests.
"""

from __future__ import annotations

from pathlib import Path


def make_adapter(out: Path, base_dir: Path, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"),
                 r: int = 8, alpha: float = 16.0, rslora: bool = False, seed: int = 0,
                 b_std: float = 0.05, spec: str | None = None, quant: str = "nf4") -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeqlora.artifacts import write_manifest
    from edgeqlora.base import base_fingerprint

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                     use_rslora=rslora, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0.0, b_std)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    fp = base_fingerprint(base_dir)
    write_manifest(out, "adapter", {
        "base": {"spec": spec or str(base_dir), "path": str(base_dir),
                 "weights_sha256": fp["weights_sha256"], "model_type": fp["model_type"]},
        "quant": {"quant": quant, "double_quant": True, "block_size": 64,
                  "compute_dtype": "float32"},
        "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": sorted(targets),
                 "rslora": rslora, "dora": False},
        "data": {"spec": "embedded:iot"},
        "metrics": {},
        "config": {},
    })
    return out
