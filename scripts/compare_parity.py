"""Compares a bamba-forward output with an HF fixture's expected.safetensors.

    python3 scripts/compare_parity.py OUT.safetensors tests/fixtures/parity/<case>/expected.safetensors

Prints one JSON line: max abs error of logits and loss, worst gradient error
relative to the gradient's max norm, and the tensor it belongs to.
"""
import json
import sys

from safetensors.numpy import load_file

got, want = load_file(sys.argv[1]), load_file(sys.argv[2])
res = {"logits_max_abs": float(abs(got["logits"] - want["logits"]).max()),
       "loss_abs": float(abs(got["loss"] - want["loss"]).max()),
       "loss": float(got["loss"][0]), "hf_loss": float(want["loss"][0])}
worst, name = 0.0, None
for k, w in want.items():
    if k.startswith("grad."):
        rel = float(abs(got[k] - w).max() / max(abs(w).max(), 1e-12))
        if rel > worst:
            worst, name = rel, k
res.update(grad_worst_rel=worst, grad_worst=name)
print(json.dumps(res))
