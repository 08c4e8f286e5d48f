"""Does llama.cpp run on this machine? A tiny random Llama-architecture model is written as f16 GGUF, quantized to
q8_0 and q4_k_m, and each file is evaluated by llama.cpp in a child process (`qlora.isolate`).

    python -m qlora.probe          # one line; exit 1 with the rebuild command if llama.cpp crashes here

llama-cpp-python compiled with `-march=native` uses whatever the build machine's CPU advertises (AVX-512, AMX); on a
machine that lacks it, or whose kernel does not grant it, f16 files may still run while quantized ones die with
SIGILL in the matrix kernels. The model is written with gguf-py alone (no torch, no tokenizer file), so the probe runs
right after installing, on a GPU host or Colab as well as here.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .isolate import REBUILD_LLAMA_CPP, ChildCrashed, ChildFailed, run_isolated

TYPES = ("f16", "q8_0", "q4_k_m")
# k-quants work on blocks of 256 values, so every matrix row is 256 wide; one block is enough to reach every kernel
WIDTH, FFN, LAYERS, HEADS = 256, 512, 1, 4
SPECIALS = ("<unk>", "<s>", "</s>")
PROMPT = [1] + list(range(3 + 65, 3 + 65 + 31))  # BOS, then 31 byte tokens: a batch, so the matrix-matrix path runs


def vocabulary(size: int) -> tuple[list[bytes], list[int]]:
    """SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens <0x00>..<0xFF>, then plain tokens."""
    import gguf

    tokens = [s.encode() for s in SPECIALS] + [f"<0x{b:02X}>".encode() for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    plain = size - len(tokens)
    return tokens + [f"t{i}".encode() for i in range(plain)], types + [gguf.TokenType.NORMAL] * plain


@dataclass(frozen=True)
class Shape:
    width: int = WIDTH
    ffn: int = FFN
    layers: int = LAYERS
    heads: int = HEADS
    kv_heads: int = HEADS
    vocab: int = len(SPECIALS) + 256


# Mistral-7B's matrices (bench/bench_llama_cpp.py uses a few of its layers to time llama.cpp builds)
MISTRAL_7B = Shape(width=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=32000)


def write_tiny_gguf(path: Path, shape: Shape = Shape(), seed: int = 0) -> Path:
    """A Llama with random f16 weights and a byte vocabulary, written by gguf-py (the tiny probe model by default)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary(shape.vocab)
    head = shape.width // shape.heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)  # llama.cpp rounds any context up to 256
    writer.add_embedding_length(shape.width)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def weight(*dims):
        return (rng.standard_normal(dims, dtype=np.float32) * 0.05).astype(np.float16)

    kv = shape.kv_heads * head
    writer.add_tensor("token_embd.weight", weight(len(tokens), shape.width))
    writer.add_tensor("output_norm.weight", np.ones(shape.width, dtype=np.float32))
    writer.add_tensor("output.weight", weight(len(tokens), shape.width))
    for layer in range(shape.layers):
        for name, dims in (("attn_q", (shape.width, shape.width)), ("attn_k", (kv, shape.width)),
                           ("attn_v", (kv, shape.width)), ("attn_output", (shape.width, shape.width)),
                           ("ffn_gate", (shape.ffn, shape.width)), ("ffn_up", (shape.ffn, shape.width)),
                           ("ffn_down", (shape.width, shape.ffn))):
            writer.add_tensor(f"blk.{layer}.{name}.weight", weight(*dims))
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ones(shape.width, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def evaluate(f16_path: str, gguf_type: str) -> list[int]:
    """In the child: quantize the f16 file to `gguf_type` (llama.cpp's quantizer) and greedily decode 4 tokens."""
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the quantizer's per-tensor lines
    path = f16_path
    if gguf_type != "f16":
        path = f16_path.replace("-f16.gguf", f"-{gguf_type}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
        if llama_cpp.llama_model_quantize(f16_path.encode(), path.encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize the probe model to {gguf_type}")
    llm = llama_cpp.Llama(path, n_ctx=256, n_batch=64, verbose=False)
    return [token for token, _ in zip(llm.generate(PROMPT, temp=0.0), range(4))]


def check() -> dict[str, str]:
    """Per GGUF type: "ok", or why llama.cpp could not run it (the signal that killed it, or its error)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlora-probe-") as folder:
        f16 = str(write_tiny_gguf(Path(folder) / "probe-f16.gguf"))
        for gguf_type in TYPES:
            try:
                run_isolated(f"llama.cpp on a {gguf_type} file", evaluate, f16, gguf_type)
                results[gguf_type] = "ok"
            except (ChildCrashed, ChildFailed) as err:
                results[gguf_type] = str(err)
    return results


def verdict(results: dict[str, str]) -> str | None:
    """None when every file ran, else one line naming what died and how to rebuild llama.cpp."""
    failed = [why for why in results.values() if why != "ok"]
    if not failed:
        return None
    return (f"{failed[0]} ({len(failed)} of {len(results)} probe files failed): this llama-cpp-python was compiled "
            f"for instructions this machine does not run; rebuild it portably: {REBUILD_LLAMA_CPP}")


def main() -> int:
    problem = verdict(check())
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"llama.cpp runs {', '.join(TYPES)} GGUF files on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
