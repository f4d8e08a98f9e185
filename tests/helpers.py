"""What test files import: tiny random-weight Llama models built in code, tiny recipes run through
the pipeline, and the check that distillation lowered the KL. Fixtures live in conftest.py.

Importing this module also caps torch at two threads, in pytest and in the worker scripts tests
start (torchrun ranks), so their numbers agree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_VOCAB = 512

# A ChatML chat template for the tiny tokenizer (which has none), as SmolLM2's.
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


def tiny_llama(layers: int = 4, seed: int = 0, hidden: int = 32, vocab: int = TINY_VOCAB, heads: int = 4,
               kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    # Random init gives a near-uniform teacher; widen the logits so there is something to distil.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    return model.eval()


# ---------------------------------------------------------------- tiny recipes through the pipeline


def tiny_recipe(tmp_path: Path, teacher_dir: Path, text: Path, *, name: str = "v", seed: int = 0,
                **sections) -> dict:
    """A recipe for a tiny teacher on local text; ``sections`` replace the defaults (``distill`` is merged)."""
    recipe = {
        "name": name, "seed": seed, "run_dir": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache"),
        "teacher": {"model": str(teacher_dir)},
        "student": {"from_teacher": {"keep_layers": [0, 3]}},
        "data": {"source": {"kind": "text", "path": str(text)}, "block_size": 32, "heldout_fraction": 0.1},
        "distill": {"steps": 25, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "eval_every": 25,
                    "eval_blocks": 4, "checkpoint_every": 25},
        "evaluate": {"eval_blocks": 8},
        "report": {"enabled": False},
    }
    for key, value in sections.items():
        if key == "distill":  # merged, so a test names only what it changes
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def run(recipe: dict) -> dict:
    """Every stage of ``recipe``, quietly; returns eval/summary.json."""
    from distillery.pipeline import run_stages
    from distillery.recipe import parse_recipe

    r = parse_recipe(recipe)
    run_stages(r, progress=False, log=lambda m: None)
    return json.loads((r.run_path / "eval" / "summary.json").read_text())


def assert_kl_lowered(summary: dict, factor: float = 0.9):
    assert summary["student"]["kl_to_teacher"] < factor * summary["student_init"]["kl_to_teacher"], summary
