"""Export a Llama-architecture Hugging Face model and its tokenizer to one GGUF file (llama.cpp,
Ollama, LM Studio), written with the ``gguf`` package's ``GGUFWriter``.

Conventions follow llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM``:

- tensor names from ``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, n_layers)`` (``token_embd``,
  ``blk.N.attn_q`` ... ``output_norm``; no ``output`` tensor when the head is tied);
- q and k projection rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved one (k over the key/value heads);
- 1-D tensors (norms) always F32; 2-D tensors in the chosen type, falling back to F16 where a
  row is not a whole number of 32-wide quantization blocks (as llama.cpp does);
- the tokenizer as a ``gpt2`` (byte-level BPE) vocabulary: tokens by id (``[PAD<i>]`` fill up to
  the model's vocab size), token types (normal / control / user-defined), merges, special token
  ids and the chat template through ``gguf.SpecialVocab``.

Types: ``F32``, ``F16``, ``Q8_0`` (``gguf.quants.quantize``) and ``Q4_0`` (also quantized by the
``gguf`` package; its token embedding is kept at Q8_0, as llama.cpp keeps the embedding at a
higher precision in its 4-bit mixes). A factored (lowrank) model is folded to dense first; a
torchao-quantized one is de-quantized first (the GGUF holds its own quantization).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

TYPES = ("F32", "F16", "Q8_0", "Q4_0")
BLOCK = 32  # elements per Q8_0 / Q4_0 block


class ExportError(ValueError):
    """A model or request the GGUF exporter cannot take; the message names what is at fault."""


def permute_rope(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotate-half row order -> interleaved pairs, per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _check_model(config) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(f"model_type: only llama-architecture models are exported to GGUF here "
                          f"(got {getattr(config, 'model_type', None)!r})")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"rope_parameters: rope_type {rope.get('rope_type')!r} is not exported (needs rope_freqs)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("attention_bias/mlp_bias: llama GGUF files carry no projection biases")


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


@torch.no_grad()
def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain float32 tensors: factored layers folded, torchao tensors
    de-quantized."""
    from distillery.compress.lowrank import LowRankLinear, fold_lowrank

    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        model = fold_lowrank(copy.deepcopy(model))
    state = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"{name}: not a tensor ({type(t).__name__}); torch_dynamic models cannot be exported")
        if hasattr(t, "dequantize") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            t = t.dequantize()
        state[name] = t.detach().float().cpu()
    return state


def _tokenizer_pre(tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizers whose splitting we can recognise."""
    import json

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"  # GPT-2's split regex
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and steps[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    raise ExportError(f"tokenizer_pre: cannot tell llama.cpp's pre-tokenizer for this tokenizer "
                      f"({json.dumps(pre)[:120]}); pass one (e.g. gpt2, smollm, llama-bpe, qwen2)")


def _vocab(tokenizer, vocab_size: int):
    """(tokens, token types) by id, as llama.cpp's ``get_vocab_base`` builds them."""
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError("tokenizer: a fast (tokenizers) byte-level BPE tokenizer is needed for a gpt2 GGUF vocabulary")
    model = tokenizer.backend_tokenizer.model
    if type(model).__name__ != "BPE":
        raise ExportError(f"tokenizer: {type(model).__name__} vocabularies are not exported (byte-level BPE only)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(f"tokenizer: {len(vocab)} tokens but the model has only {vocab_size} embeddings")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else True
            looks = token.startswith("<|") and token.endswith("|>")
            types.append(gguf.TokenType.CONTROL if special or looks else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _tensor_type(name: str, shape: tuple[int, ...], out_type: str):
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight") or out_type == "F32":
        return q.F32
    if out_type == "F16" or shape[-1] % BLOCK:  # rows must be whole quantization blocks
        return q.F16
    if out_type == "Q4_0" and name.startswith("token_embd"):
        return q.Q8_0
    return {"Q8_0": q.Q8_0, "Q4_0": q.Q4_0}[out_type]


def _encode(data: np.ndarray, qtype) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return data.astype(np.float32)
    if qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def export_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, out_type: str = "Q8_0", *,
                name: str | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` (a Llama-architecture causal LM) and ``tokenizer`` (with its chat template)
    to the GGUF file ``path`` atomically; ``out_type`` is one of F32, F16, Q8_0, Q4_0."""
    from distillery.io import atomic_path

    if out_type not in TYPES:
        raise ExportError(f"out_type: {out_type!r} is not one of {', '.join(TYPES)}")
    config = model.config
    _check_model(config)
    pre = tokenizer_pre or _tokenizer_pre(tokenizer)
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    state = float_state(model)
    tokens, types = _vocab(tokenizer, config.vocab_size)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type]

    path = Path(path)
    with tempfile.TemporaryDirectory() as tok_dir, atomic_path(path) as tmp:
        tokenizer.save_pretrained(tok_dir)  # SpecialVocab reads merges, special ids, chat template from files
        special = gguf.SpecialVocab(Path(tok_dir), load_merges=True, n_vocab=len(tokens))
        if not special.merges:
            raise ExportError("tokenizer: no BPE merges found; a gpt2 GGUF vocabulary needs them")
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name or getattr(config, "_name_or_path", "") or "distillery-student")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        # a pruned model's head_dim is not hidden / heads: llama.cpp reads it from these
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)

        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads the tied head from token_embd
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise ExportError(f"{hf_name}: no GGUF tensor name for it in llama's tensor map")
            data = tensor.numpy()
            if hf_name.endswith("q_proj.weight"):
                data = permute_rope(data, n_head, n_head)
            elif hf_name.endswith("k_proj.weight"):
                data = permute_rope(data, n_head, n_kv)
            qtype = _tensor_type(gname, data.shape, out_type)
            writer.add_tensor(gname, _encode(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def export_gguf_folder(folder: str | os.PathLike, path: str | os.PathLike, out_type: str = "Q8_0",
                       **kwargs) -> Path:
    """``export_gguf`` of a saved Hugging Face folder (model and tokenizer; a lowrank or torchao
    folder too)."""
    from transformers import AutoTokenizer

    from distillery.compress.lowrank import load_lowrank

    folder = Path(folder)
    model = load_lowrank(folder, dtype=None)  # a plain folder loads as usual
    return export_gguf(model, AutoTokenizer.from_pretrained(folder), path, out_type, **kwargs)


def load_gguf_back(path: str | os.PathLike):
    """(model, tokenizer) read back from a GGUF file by transformers (de-quantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok
