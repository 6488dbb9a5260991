"""Offline throughput on one GPU, full-size shapes with dummy weights (runs exactly like real ones).

    python benchmarks/offline_gpu.py [--shape llama-2-7b] [--requests 256] [--max-tokens 128]

Prints JSON: load time, KV cache size, output tokens/s at batch 1 and with every request in
flight, and peak GPU memory. Needs CUDA; prompts are random token ids, so no tokenizer
download is involved (a word-level tokenizer over the vocabulary is written for decoding).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-2-7b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def write_model_dir(shape: str, out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    cfg = SHAPES[shape]
    (out / "config.json").write_text(json.dumps(cfg))
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2").save_pretrained(
        str(out)
    )
    return out


def run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    import ember

    params = ember.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    results = llm.generate(prompts, params)
    torch.cuda.synchronize()
    return sum(len(r.outputs[0].token_ids) for r in results), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    args = ap.parse_args()

    import ember

    model_dir = write_model_dir(args.shape, Path(tempfile.mkdtemp()))
    t0 = time.perf_counter()
    llm = ember.LLM(str(model_dir), load_format="dummy", dtype="bfloat16", max_num_seqs=256)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    prompts = [
        [rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)
    ]
    run(llm, prompts[:2], 4)  # warm-up
    b1_tok, b1_s = run(llm, prompts[:1], args.max_tokens)
    all_tok, all_s = run(llm, prompts, args.max_tokens)
    report = {
        "device": torch.cuda.get_device_name(),
        "shape": args.shape,
        "dtype": "bfloat16",
        "load_s": round(load_s, 1),
        "kv_cache_blocks": llm.engine.allocator.num_blocks,
        "kv_cache_tokens": llm.engine.allocator.num_blocks * llm.config.block_size,
        "batch1_tokens_per_s": round(b1_tok / b1_s, 1),
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "batched_tokens_per_s": round(all_tok / all_s, 1),
        "batched_seconds": round(all_s, 2),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
