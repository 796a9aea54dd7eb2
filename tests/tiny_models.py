"""Tiny randomly initialised causal LMs of each supported family, with a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
)

VOCAB = 96


def tiny_model(family: str, seed: int = 0, layers: int = 6) -> PreTrainedModel:
    """A tiny fp32 model of ``family`` (llama, gpt2, opt) in eval mode."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True, pad_token_id=0, eos_token_id=0)
        model: PreTrainedModel = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                         pad_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                        pad_token_id=0, eos_token_id=0, bos_token_id=0)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit :data:`VOCAB` (id 0 is pad == eos)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 32 + VOCAB - 2)]
    vocab = {"<pad>": 0, "<unk>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>", unk_token="<unk>")


def save_tiny(directory: Path, family: str, seed: int = 0, layers: int = 6) -> Path:
    """Writes a tiny model and its tokenizer as a local HF directory (safetensors)."""
    model = tiny_model(family, seed, layers)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write_toy_sentiment(directory: Path, train_rows: int = 24, eval_rows: int = 6) -> tuple[Path, Path]:
    """Writes a tiny prompt/completion training file and a matching multiple-choice eval file."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Review: {'good' if i % 2 else 'bad'} {i}\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(train_rows)]
    evals = [{"prompt": f"Review: {'good' if i % 2 else 'bad'}\nSentiment:", "choices": [" negative", " positive"],
              "answer": i % 2} for i in range(eval_rows)]
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in evals))
    return train, held_out
