"""A tiny random Llama with a real byte-level chat tokenizer, for runner tests in seconds.

The tokenizer is a genuine ``tokenizers`` BPE over the 256 byte symbols (no merges), with
SmolLM2's chat template and its ``<|im_start|>``/``<|im_end|>`` special tokens, so prompts
are formatted, split and decoded exactly as for the real model; one token per byte.
"""

from __future__ import annotations

import torch

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_chat_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    )
    tok.chat_template = SMOL_TEMPLATE
    return tok


def tiny_chat_model(seed: int = 0):
    """``(model, tokenizer)``: a 2-layer random Llama (GQA, head dim 32) sized to the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = byte_chat_tokenizer()
    config = LlamaConfig(
        num_hidden_layers=2,
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=8192,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, tok
