"""The tutorial's two models at full size on the CPU, with dummy weights: shapes, memory, speed.

Writes a directory per model with the real config.json (ChatGLM3-6B, Llama-2-7b-chat-hf) and a
small SentencePiece tokenizer trained on the spot (the vocabulary size does not matter for a
shape check: the logits keep the real width), starts `ember.LLM` on it with `--load-format dummy`
in bfloat16 (float32 would not fit in 24 GiB), runs a chat turn through the model's own prompt
format and prints one JSON object per model: parameters, load time, peak RSS, tokens/s.

    python benchmarks/full_size_cpu.py [--models chatglm3-6b llama-2-7b-chat] [--max-tokens 4]
                                       [--quantization none|int8|int4]

With --quantization int4 (or int8) the model runs in float32 activations with its linear layers
quantized at load; the JSON adds the weight bytes (quantized layers plus the float embedding
and norms) and peak RSS over them.

Each model runs in its own process so one's memory never counts against the other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHATGLM3_6B = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "apply_residual_connection_post_layernorm": False,
    "ffn_hidden_size": 13696,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 28,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 8192,
    "torch_dtype": "float16",
    "tie_word_embeddings": False,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LLAMA_2_7B_CHAT = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32000,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 你好，世界！今天天气很好。",
    "Kubernetes serves the model behind an OpenAI-compatible API with health checks.",
    "What is the capital of France? Paris is the capital of France.",
] * 50


def write_dir(root: Path, name: str) -> Path:
    import sentencepiece as spm

    out = root / name
    out.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(out / "tokenizer"),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    if name.startswith("chatglm3"):
        config, tok_cfg = CHATGLM3_6B, {"tokenizer_class": "ChatGLMTokenizer"}
    else:
        config = LLAMA_2_7B_CHAT
        tok_cfg = {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "legacy": False,
            "add_bos_token": True,
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return out


def run_one(model_dir: str, max_tokens: int, quantization: str = "none") -> dict:
    import torch

    from ember.engine.request import SamplingParams
    from ember.offline import LLM

    t0 = time.perf_counter()
    quantized = quantization != "none"
    llm = LLM(
        model_dir,
        load_format="dummy",
        # Quantized layers take float32 activations (the C kernels); the weights are drawn
        # straight into their quantized buffers, so no float copy of them ever exists.
        dtype="float32" if quantized else "bfloat16",
        max_model_len=512,
        kv_cache_memory="256MiB",
        quantization=quantization,
    )
    load_s = time.perf_counter() - t0
    model = llm.engine.runner.model
    params = sum(p.numel() for p in model.parameters())
    params += sum(
        m.in_features * m.out_features for m in model.modules() if getattr(m, "quant", None)
    )
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    t1 = time.perf_counter()
    (result,) = llm.chat(messages, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    gen_s = time.perf_counter() - t1
    out = result.outputs[0]
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": Path(model_dir).name,
        "quantization": llm.engine.runner.quantization,
        "weight_gib": round(weight_bytes / 2**30, 2),
        "peak_rss_over_weights": round(peak / weight_bytes, 2),
        "parameters": params,
        "dtype": str(next(model.parameters()).dtype),
        "load_s": round(load_s, 1),
        "prompt_tokens": len(result.prompt_token_ids),
        "generated_tokens": len(out.token_ids),
        "generate_s": round(gen_s, 1),
        "tokens_per_s": round(len(out.token_ids) / gen_s, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["chatglm3-6b", "llama-2-7b-chat"])
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument(
        "--quantization", default="none", choices=["none", "int8", "int4"], help="weights"
    )
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one directory
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.max_tokens, args.quantization)))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model_dir = write_dir(Path(tmp), name)
            cmd = [sys.executable, __file__, "--run", str(model_dir)]
            cmd += ["--max-tokens", str(args.max_tokens), "--quantization", args.quantization]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            if proc.returncode != 0:
                results.append({"model": name, "error": f"exit {proc.returncode}"})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
