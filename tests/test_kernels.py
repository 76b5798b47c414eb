"""The fast engine's Triton kernels (run on CPU through Triton's interpreter) against its torch ops."""

import pytest
import torch

from onelayer.errors import OneLayerError
from onelayer.rollout import (
    FastGenerator,
    HFGenerator,
    completion_logprobs,
    kernels,
    make_generator,
    render_prompts,
)
from onelayer.rollout.fast import cached_attention, sample_tokens

from .tiny import joint_generations, tiny_model


def _prompts(tokenizer, texts=("abc", "x y z qq", "12")):
    return render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])


def _attention_inputs(batch=4, q_heads=6, kv_heads=2, columns=150, dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    query = torch.randn(batch, q_heads, 1, dim, generator=g).to(dtype)
    key = torch.randn(batch, kv_heads, columns, dim, generator=g).to(dtype)
    value = torch.randn(batch, kv_heads, columns, dim, generator=g).to(dtype)
    mask = torch.rand(batch, 1, 1, columns, generator=g) > 0.3
    mask[..., 120:] = False  # columns not written yet: whole blocks skipped
    mask[1, ..., :70] = False  # long left padding: a whole block skipped, the next one partly
    mask[2, ..., 64:128] = False  # a hidden block between visible ones
    mask[:, ..., 100] = True  # every row sees something
    return query, key, value, mask


@pytest.mark.parametrize("q_heads,kv_heads,dim", [(6, 2, 16), (4, 4, 8), (8, 2, 64), (3, 1, 16)])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_decode_attention_equals_the_matmuls(q_heads, kv_heads, dim, softcap):
    query, key, value, mask = _attention_inputs(q_heads=q_heads, kv_heads=kv_heads, dim=dim)
    fused = kernels.decode_attention(query, key, value, mask, 0.3, softcap or 0.0)
    reference, _ = cached_attention(None, query, key, value, mask, scaling=0.3, softcap=softcap)
    assert fused.shape == reference.shape == (4, 1, q_heads, dim)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_decode_attention_in_bf16_is_within_bf16_rounding():
    query, key, value, mask = _attention_inputs(dtype=torch.bfloat16)
    fused = kernels.decode_attention(query, key, value, mask, 0.25)
    exact, _ = cached_attention(None, query.float(), key.float(), value.float(), mask, scaling=0.25)
    assert fused.dtype == torch.bfloat16
    assert (fused.float() - exact).abs().max() < 2e-2
    # as close to the float32 result as the torch ops in bf16, within a rounding step
    ops, _ = cached_attention(None, query, key, value, mask, scaling=0.25)
    assert (fused.float() - exact).abs().mean() < 2 * (ops.float() - exact).abs().mean()


def test_decode_attention_reads_strided_cache_windows():
    query, key, value, mask = _attention_inputs(columns=200)
    window = slice(0, 150)  # as the static cache returns its first columns: not contiguous
    fused = kernels.decode_attention(query, key[:, :, window], value[:, :, window], mask[..., window], 0.3)
    reference, _ = cached_attention(None, query, key[:, :, window].contiguous(), value[:, :, window].contiguous(),
                                    mask[..., window], scaling=0.3)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)


def test_sample_draws_the_token_the_torch_ops_draw():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 9000, generator=g) * 4  # three blocks of the kernel, the last one partial
    logits[:, 8000:] = float("-inf")  # e.g. EOS masked out for fixed-length benchmarks
    logits[3, 17] = 80.0  # a row with one certain token
    uniform = torch.rand(64, generator=g)
    uniform[5] = 1 - 2 ** -24  # the top of the range never lands on a token of zero probability
    uniform[6] = 2 ** -24
    tokens, logprobs = kernels.sample(logits, 0.7, uniform)
    expected_tokens, expected_logprobs = sample_tokens(logits, 0.7, 1.0, uniform)
    # row 5's uniform is within float rounding of the total mass: the two sums, added in other orders,
    # pick different tokens at the top of the vocabulary, both of nonzero probability
    rest = torch.arange(64) != 5
    assert torch.equal(tokens[rest], expected_tokens[rest])
    torch.testing.assert_close(logprobs[rest], expected_logprobs[rest], atol=1e-5, rtol=1e-5)
    assert tokens[3] == 17 and tokens.max() < 8000 and 7900 < tokens[5] and logprobs.isfinite().all()
    # and sample_tokens hands the same call to the kernel when asked
    assert torch.equal(sample_tokens(logits, 0.7, 1.0, uniform, fused=True)[0], tokens)


def test_sample_reads_bf16_logits_as_their_float32_values():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(16, 5000, generator=g) * 3).bfloat16()
    uniform = torch.rand(16, generator=g)
    tokens, logprobs = kernels.sample(logits, 1.0, uniform)
    expected_tokens, expected_logprobs = kernels.sample(logits.float(), 1.0, uniform)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logprobs, expected_logprobs)


@pytest.mark.parametrize("arch,temperature,top_p,raw", [("llama", 1.0, 1.0, True), ("llama", 0.0, 1.0, False),
                                                        ("llama", 1.0, 0.9, False), ("gemma2", 1.0, 1.0, False)])
def test_the_head_output_goes_to_the_sampling_kernel_uncast_only_where_it_samples(tokenizer, arch, temperature,
                                                                                  top_p, raw):
    # greedy and top-p use the torch ops (float32 logits); Gemma 2 softcaps its logits in float32 first
    from onelayer.rollout.fast import DecodeState

    state = DecodeState(tiny_model(arch), 2, 64, temperature, top_p, [1], 0, cuda_graphs=False, fused=True)
    assert state.raw_logits is raw


# Triton's interpreter runs each program in Python (~0.1 s a launch here): a few short generations
@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_greedy_with_kernels_equals_generate(arch, tokenizer):
    model = tiny_model(arch)  # qwen3: q/k norms; gemma2: attention softcap, sliding windows
    prompts = _prompts(tokenizer, ("abc", "x y z qq"))
    fast = FastGenerator(model, tokenizer, kernels=True).generate(prompts, 1, 10, temperature=0.0)
    plain = HFGenerator(model, tokenizer).generate(prompts, 1, 10, temperature=0.0)
    assert torch.equal(fast.input_ids, plain.input_ids)


def test_sampling_with_kernels_equals_sampling_without(tokenizer):
    model = tiny_model("qwen3")
    prompts = _prompts(tokenizer, ("abc", "x y z qq"))
    with_kernels = FastGenerator(model, tokenizer, kernels=True).generate(prompts, 2, 10, temperature=1.5, seeds=[3])
    without = FastGenerator(model, tokenizer, kernels=False).generate(prompts, 2, 10, temperature=1.5, seeds=[3])
    assert torch.equal(with_kernels.input_ids, without.input_ids)
    plain = completion_logprobs(model, with_kernels.input_ids, with_kernels.attention_mask,
                                with_kernels.prompt_length, with_kernels.completion_mask, temperature=1.5)
    torch.testing.assert_close(with_kernels.logprobs, plain, atol=1e-4, rtol=0)


def test_compiled_decode_runs_the_kernels_as_custom_ops(tokenizer):
    model = tiny_model("llama")
    prompts = _prompts(tokenizer, ("abc",))
    eager = FastGenerator(model, tokenizer, kernels=True).generate(prompts, 2, 6, temperature=1.0, seeds=[5])
    compiled = FastGenerator(model, tokenizer, kernels=True, compiled=True).generate(prompts, 2, 6, temperature=1.0,
                                                                                     seeds=[5])
    assert torch.equal(compiled.input_ids, eager.input_ids)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-5, rtol=0)


def test_kernels_are_off_by_default_on_cpu_and_refused_where_they_cannot_run(tokenizer, monkeypatch):
    model = tiny_model("llama")
    assert not FastGenerator(model, tokenizer).kernels
    assert not make_generator(model, tokenizer, engine="fast").kernels
    monkeypatch.setattr(kernels, "INTERPRETING", False)
    with pytest.raises(ValueError, match="only through Triton's interpreter"):
        FastGenerator(model, tokenizer, kernels=True)
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(ValueError, match="pip install triton"):
        FastGenerator(model, tokenizer, kernels=True)


def test_a_failing_kernel_is_one_line_naming_the_fix(tokenizer, monkeypatch):
    class CompilationError(Exception):  # as Triton's compiler raises them
        __module__ = "triton.compiler.errors"

    def broken(*_):
        raise CompilationError("at 3:4: unsupported layout\nlong details")

    monkeypatch.setattr(kernels, "sample", broken)
    generator = FastGenerator(tiny_model("llama"), tokenizer, kernels=True)
    with pytest.raises(OneLayerError, match=r"unsupported layout\); rerun with --no-fused-kernels$"):
        generator.generate(_prompts(tokenizer, ("abc",)), 1, 3, temperature=1.0)
    monkeypatch.setattr(kernels, "sample", lambda *_: 1 / 0)  # anything else is not blamed on the kernels
    with pytest.raises(ZeroDivisionError):
        generator.generate(_prompts(tokenizer, ("abc",)), 1, 3, temperature=1.0)


def test_joint_generation_of_layer_variants_with_kernels_equals_without(tokenizer):
    # routing acts on the weighted leaves; the attention kernel sees the whole joint batch as it is
    with_kernels, without = joint_generations(tokenizer, [{"kernels": True}, {"kernels": False}], texts=("ab",),
                                              samples=2, new_tokens=6)
    assert torch.equal(with_kernels.input_ids, without.input_ids)
    torch.testing.assert_close(with_kernels.logprobs, without.logprobs, atol=1e-5, rtol=0)
