"""Generates the HF-parity fixtures under tests/fixtures/parity/ with HF transformers.

Run where transformers (with Bamba) is installed, on CPU so that HF takes its
reference `torch_forward` path, in float32:

    python3 scripts/make_parity_fixtures.py tests/fixtures/parity

Each case is a directory holding an HF model (config.json + safetensors, saved
by `save_pretrained`), `inputs.safetensors` (`input_ids`, int64 [batch, seq])
and `expected.safetensors` with `logits`, `loss` and `grad.<name>` for every
parameter after `loss.backward()` of HF's loss with `labels = input_ids`.
Parameters are drawn at random (not HF's constant init) so every gradient is
informative and a wrong formula cannot hide behind ones and zeros.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import BambaConfig, BambaForCausalLM

CASES = {
    # attention as the first layer, GQA with 2 query heads per KV head, 2 groups,
    # seq 37 = 2 full chunks of 16 + a partial one, 2 batch rows.
    "hybrid_groups": dict(
        cfg=dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[0, 2],
                 mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                 mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, tie_word_embeddings=False),
        batch=2, seq=37, shard=None),
    # tied embeddings, z-loss, a finite time-step limit that clamps, 4 query heads
    # per KV head, 3 batch rows, seq shorter than one chunk, sharded checkpoint.
    "tied_zloss_clamp": dict(
        cfg=dict(vocab_size=192, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=1, attn_layer_indices=[1],
                 mamba_n_heads=6, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                 mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=32, tie_word_embeddings=True,
                 z_loss_coefficient=1e-3, time_step_limit=(0.0, 0.6)),
        batch=3, seq=21, shard="60KB"),
    # Mamba only, 4 groups, conv without bias, many chunks of 8 with seq 44.
    "mamba_many_chunks": dict(
        cfg=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, attn_layer_indices=[],
                 mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=4, mamba_d_state=8,
                 mamba_d_conv=3, mamba_expand=2, mamba_chunk_size=8, mamba_conv_bias=False,
                 tie_word_embeddings=False),
        batch=1, seq=44, shard=None),
}


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = lambda: torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(r() * 1.0 - 1.5)  # softplus spread around 0.05..2: some clamp at 0.6
            elif name.endswith(".D") or name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * r())
            elif name.endswith("conv1d.weight") or name.endswith("bias"):
                p.copy_(0.3 * r())
            else:
                p.copy_(r() / math.sqrt(p.shape[-1]))


def main(out_root):
    torch.manual_seed(0)
    for name, case in CASES.items():
        gen = torch.Generator().manual_seed(1234)
        cfg = BambaConfig(**case["cfg"])
        cfg._attn_implementation = "eager"
        model = BambaForCausalLM(cfg).float()
        randomize(model, gen)
        model.train()
        ids = torch.randint(0, cfg.vocab_size, (case["batch"], case["seq"]), generator=gen)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        d = os.path.join(out_root, name)
        os.makedirs(d, exist_ok=True)
        kw = {"max_shard_size": case["shard"]} if case["shard"] else {}
        model.save_pretrained(d, safe_serialization=True, **kw)
        save_file({"input_ids": ids.contiguous()}, os.path.join(d, "inputs.safetensors"))
        expected = {"logits": out.logits.detach().float().contiguous(), "loss": out.loss.detach().reshape(1).float()}
        for pname, p in model.named_parameters():
            expected["grad." + pname] = p.grad.detach().float().contiguous()
        save_file(expected, os.path.join(d, "expected.safetensors"))
        rot = model.model.rotary_emb.inv_freq.numel() * 2
        print(json.dumps({"case": name, "loss": out.loss.item(), "params": sum(p.numel() for p in model.parameters()),
                          "rotary_dim": rot, "files": sorted(os.listdir(d))}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parity")
