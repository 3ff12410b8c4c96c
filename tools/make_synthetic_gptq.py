"""Write a GPTQ checkpoint with random weights and the shapes/config of a real model.

Used for what needs real sizes but no real weights: the converter's peak-RSS measurement and the
end-to-end benchmark (a full-size Qwen3-1.7B-shaped model in GPTQ-Int8 form). No tokenizer is written
unless --tokenizer-from names a folder to copy one from.

    python tools/make_synthetic_gptq.py OUT --preset qwen3-1.7b [--layers 28] [--bits 8] [--group-size 128]

Tensors are streamed to disk one at a time, so this needs little memory even at full size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from gptq_ascend import format as fmt  # noqa: E402
from gptq_ascend.checkpoint import PlannedTensor, SafetensorsWriter  # noqa: E402

PRESETS = {
    # Qwen3-1.7B's config.json (hidden 2048, intermediate 6144, 28 layers, 16/8 heads, head_dim 128).
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=1024, tie_word_embeddings=True),
}


def hf_config(shape: dict, args: argparse.Namespace) -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1,
        "initializer_range": 0.02, "max_position_embeddings": args.max_position_embeddings,
        "max_window_layers": shape["num_hidden_layers"], "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False, "use_cache": True,
        "torch_dtype": "float16", **shape,
        "quantization_config": {
            "quant_method": "gptq", "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
            "desc_act": False, "lm_head": False, "checkpoint_format": "gptq", "pack_dtype": "int32",
        },
    }


def linear_shapes(c: dict) -> list[tuple[str, int, int]]:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    return [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv),
            ("self_attn.o_proj", q, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i),
            ("mlp.down_proj", i, h)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-1.7b")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers")
    ap.add_argument("--vocab", type=int, help="override vocab_size")
    ap.add_argument("--bits", type=int, default=8, choices=[2, 4, 8])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-position-embeddings", type=int, default=4096)
    ap.add_argument("--tokenizer-from", type=Path, help="copy tokenizer files from this folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    if args.vocab:
        shape["vocab_size"] = args.vocab
    cfg = hf_config(shape, args)
    spec = fmt.QuantSpec(args.bits, args.group_size, args.sym, False, "gptq")
    gen = torch.Generator().manual_seed(args.seed)
    h, v = shape["hidden_size"], shape["vocab_size"]

    plan: list[PlannedTensor] = [PlannedTensor("model.embed_tokens.weight", torch.float16, (v, h)),
                                 PlannedTensor("model.norm.weight", torch.float16, (h,))]
    makers = {"model.embed_tokens.weight": lambda: torch.randn(v, h, generator=gen).half() * 0.02,
              "model.norm.weight": lambda: torch.ones(h, dtype=torch.float16)}
    for layer in range(shape["num_hidden_layers"]):
        pre = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan.append(PlannedTensor(f"{pre}.{norm}.weight", torch.float16, (h,)))
            makers[plan[-1].name] = lambda: torch.ones(h, dtype=torch.float16)
        for norm in ("self_attn.q_norm", "self_attn.k_norm"):
            plan.append(PlannedTensor(f"{pre}.{norm}.weight", torch.float16, (shape["head_dim"],)))
            makers[plan[-1].name] = lambda: torch.ones(shape["head_dim"], dtype=torch.float16)
        for name, k, n in linear_shapes(shape):
            groups = spec.num_groups(k)
            parts = {
                "g_idx": (torch.int32, (k,)),
                "qweight": (torch.int32, (fmt.packed_len(k, spec.bits), n)),
                "qzeros": (torch.int32, (groups, fmt.packed_len(n, spec.bits))),
                "scales": (torch.float16, (groups, n)),
            }
            cache: dict = {}

            def layer_tensors(k=k, n=n, groups=groups, cache=cache):
                if not cache:
                    # Roughly Gaussian codes around the zero point, like real GPTQ weights.
                    q = (torch.randn(k, n, generator=gen) * (2 ** spec.bits / 8) + spec.sym_zero)
                    q = q.round().clamp(0, spec.max_code).to(torch.int32)
                    z = torch.full((groups, n), spec.sym_zero, dtype=torch.int32) if spec.sym else \
                        torch.randint(0, spec.max_code + 1, (groups, n), generator=gen, dtype=torch.int32)
                    scale = 0.02 * 8 / 2 ** spec.bits
                    cache.update(qweight=fmt.pack(q, spec.bits, 0), qzeros=fmt.pack_zeros(z, spec),
                                 scales=(torch.rand(groups, n, generator=gen) * scale + scale / 2).half(),
                                 g_idx=fmt.default_g_idx(k, spec.group_size))
                return cache

            for part, (dtype, shp) in parts.items():
                plan.append(PlannedTensor(f"{pre}.{name}.{part}", dtype, shp))
                makers[plan[-1].name] = lambda part=part, f=layer_tensors: f().pop(part)

    args.out.mkdir(parents=True, exist_ok=False)
    writer = SafetensorsWriter(args.out / "model.safetensors", plan)
    for p in plan:
        writer.write(p.name, makers[p.name]())
    writer.close()
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (args.out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, indent=2) + "\n")
    if args.tokenizer_from:
        for f in args.tokenizer_from.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(f, args.out / f.name)
    print(f"wrote {args.out} ({shape['num_hidden_layers']} layers, {args.bits}-bit, group {args.group_size})")


if __name__ == "__main__":
    main()
