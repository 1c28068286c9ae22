"""Write a random-weight, sharded bf16 Llama checkpoint of a chosen size, streaming.

Weights are generated a few MB at a time and written with loratool's streaming safetensors
writer, so making a 1B (2 GB) or 8B (16 GB) checkpoint needs no more memory than one chunk.
The directory loads with ``transformers.AutoModelForCausalLM.from_pretrained`` (config.json and
generation_config.json are written; there is no tokenizer).

    python benchmarks/make_synthetic_llama.py OUT                  # ~1.04B parameters, 2.1 GB
    python benchmarks/make_synthetic_llama.py OUT --layers 8       # ~0.55B
    python benchmarks/make_synthetic_llama.py OUT --shard-size 500MB --seed 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loratool._io import atomic_dir  # noqa: E402
from loratool.stream import (  # noqa: E402
    SafetensorsWriter,
    TensorSpec,
    plan_shards,
    shard_names,
    write_index,
)

CHUNK_ELEMENTS = 1 << 22  # generated per step: 16 MB of fp32 temporaries


def llama_specs(
    *,
    vocab: int,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    tied: bool,
) -> list[TensorSpec]:
    """Tensor names and shapes of ``LlamaForCausalLM``, in the order HF lists them."""
    head_dim = hidden // heads
    specs = [TensorSpec("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", "BF16", (hidden,)),
            TensorSpec(p + "self_attn.q_proj.weight", "BF16", (heads * head_dim, hidden)),
            TensorSpec(p + "self_attn.k_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
            TensorSpec(p + "self_attn.v_proj.weight", "BF16", (kv_heads * head_dim, hidden)),
            TensorSpec(p + "self_attn.o_proj.weight", "BF16", (hidden, heads * head_dim)),
            TensorSpec(p + "post_attention_layernorm.weight", "BF16", (hidden,)),
            TensorSpec(p + "mlp.gate_proj.weight", "BF16", (intermediate, hidden)),
            TensorSpec(p + "mlp.up_proj.weight", "BF16", (intermediate, hidden)),
            TensorSpec(p + "mlp.down_proj.weight", "BF16", (hidden, intermediate)),
        ]
    specs.append(TensorSpec("model.norm.weight", "BF16", (hidden,)))
    if not tied:
        specs.append(TensorSpec("lm_head.weight", "BF16", (vocab, hidden)))
    return specs


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--untied", action="store_true", help="a separate lm_head (default: tied)")
    ap.add_argument("--shard-size", default="500MB", help="maximum shard size (default 500MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    specs = llama_specs(
        vocab=args.vocab, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
        heads=args.heads, kv_heads=args.kv_heads, tied=not args.untied,
    )  # fmt: skip
    shards = plan_shards(specs, parse_size(args.shard_size))
    names = shard_names(len(shards))
    gen = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    with atomic_dir(args.out, force=args.force) as tmp:
        weight_map: dict[str, str] = {}
        for name, group in zip(names, shards, strict=True):
            with SafetensorsWriter(tmp / name, group, {"format": "pt"}) as w:
                for s in group:
                    weight_map[s.name] = name
                    if len(s.shape) == 1:  # norms: ones, as initialised
                        w.write(s.name, torch.ones(s.shape, dtype=torch.bfloat16))
                        continue
                    step = max(1, CHUNK_ELEMENTS // s.shape[1])
                    for row in range(0, s.shape[0], step):
                        k = min(step, s.shape[0] - row)
                        x = torch.randn(k, s.shape[1], generator=gen).mul_(0.02).bfloat16()
                        w.write_part(s.name, row * s.shape[1] * 2, x)
            print(f"wrote {name}", file=sys.stderr, flush=True)
        total = sum(s.nbytes for s in specs)
        params = sum(s.numel for s in specs)
        if len(names) > 1:
            write_index(tmp, weight_map, total_size=total, metadata={"total_parameters": params})
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": args.vocab,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads,
            "head_dim": args.hidden // args.heads,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": not args.untied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "bfloat16",
            "torch_dtype": "bfloat16",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
        )
    print(
        f"{args.out}: {params / 1e9:.2f}B parameters, {total / 1e9:.2f} GB in {len(names)} shards, "
        f"{time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
