"""Loads a bamba-train HF export with transformers and compares its logits with
bamba-forward's on the same ids (the issue-7 device check).

    python3 scripts/check_hf_export.py HFDIR inputs.safetensors ours_logits.safetensors
"""
import json
import sys

import torch
from safetensors.torch import load_file
from transformers import BambaForCausalLM

model = BambaForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32, attn_implementation="eager").eval()
ids = load_file(sys.argv[2])["input_ids"]
ours = load_file(sys.argv[3])
with torch.no_grad():
    out = model(input_ids=ids, labels=ids, use_cache=False)
err = (out.logits - ours["logits"]).abs().max().item()
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "logits_max_abs": err,
                  "hf_loss": out.loss.item(), "our_loss": ours["loss"].item()}))
