"""A character-level tokenizer and tiny random models of every architecture the fast engine supports (used
by the tests, and by the benchmarks to check those architectures on a GPU; no pytest needed)."""

from __future__ import annotations

import torch

from onelayer import compat

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:#-+*/=()?!\\{}$\n")


def make_char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from onelayer.models import prepare_tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return prepare_tokenizer(tok)


VOCAB = len(CHARS) + 3
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
              initializer_range=0.3)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON)
    if arch == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON)
    if arch == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=5.0)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**COMMON, head_dim=8)
    if arch == "phi3":
        return tf.Phi3Config(**COMMON)
    if arch == "olmo2":
        return tf.Olmo2Config(**COMMON)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
                                eos_token_id=1, bos_token_id=1)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, head_dim=8, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if arch == "lfm2":  # short-convolution layers between attention layers
        return tf.Lfm2Config(**COMMON, full_attn_idxs=[1, 3])
    if arch == "llama4_text":  # its base_model_prefix names a wrapper the text model lacks (compat.backbone)
        return tf.Llama4TextConfig(**COMMON, head_dim=8)
    raise ValueError(arch)


ARCHS = ["qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3", "phi3", "olmo2", "gpt2", "gpt_neox"]
# families the fast engine was not checked on: they train with generate's samples (bench/held_out.py: ~60 more)
HELD_OUT = ["qwen3_moe", "lfm2", "llama4_text"]


def tiny_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=compat.default_attention(config))
    model.config.eos_token_id = 1
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    return model.eval()


def joint_generations(tokenizer, generator_options: list[dict], texts=("ab", "xyz"), samples: int = 3,
                      new_tokens: int = 12) -> list:
    """Joint generations of a tiny llama's layer variants (layer 1, its copy moved; layer 3), one per dict
    of FastGenerator options: rows of ``texts`` x ``samples`` per variant, each block its own seed."""
    from onelayer.rollout import FastGenerator, render_prompts
    from onelayer.variants import LayerVariants

    model = tiny_model("llama")
    variants = LayerVariants(model, [(1,), (3,)])
    for p in (p for layer in variants.copies[1].values() for p in layer.parameters()):
        p.data += 0.05
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])
    batches = []
    for options in generator_options:
        generator = FastGenerator(model, tokenizer, row_hook=variants.set_rows, **options)
        with variants.joint([0, 1], len(texts) * samples):
            batches.append(generator.generate(prompts * 2, samples, new_tokens, temperature=1.0, seeds=[3, 4]))
    return batches
