"""The fast rollout engine against transformers: greedy tokens, log-probs, sampling distribution."""

import pytest
import torch
from scipy.stats import chisquare

from onelayer.errors import OneLayerError
from onelayer.rollout import FastGenerator, HFGenerator, completion_logprobs, make_generator, render_prompts
from onelayer.rollout.fast import WINDOW, nucleus_mask, sample_tokens

from .tiny import ARCHS, tiny_model


def _prompts(tokenizer, texts=("abc", "x y z qq", "12")):
    return render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in texts])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(arch, tokenizer):
    model = tiny_model(arch)
    prompts = _prompts(tokenizer)
    # longer than two key windows, in row batches that split the prompts' samples
    fast = FastGenerator(model, tokenizer, batch_size=4).generate(prompts, 2, 2 * WINDOW + 10, temperature=0.0)
    plain = HFGenerator(model, tokenizer, batch_size=4).generate(prompts, 2, 2 * WINDOW + 10, temperature=0.0)
    assert torch.equal(fast.input_ids, plain.input_ids)
    assert torch.equal(fast.completion_mask, plain.completion_mask)
    assert fast.texts == plain.texts and torch.equal(fast.truncated, plain.truncated)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_sliding_window_layers_see_only_their_window(arch, tokenizer):
    model = tiny_model(arch)
    prompts = _prompts(tokenizer)
    unwindowed = FastGenerator(model, tokenizer).generate(prompts, 1, 40, temperature=0.0)
    model.config.sliding_window = 5
    fast = FastGenerator(model, tokenizer).generate(prompts, 1, 40, temperature=0.0)
    plain = HFGenerator(model, tokenizer).generate(prompts, 1, 40, temperature=0.0)
    assert torch.equal(fast.input_ids, plain.input_ids)
    assert not torch.equal(fast.input_ids, unwindowed.input_ids)  # the window changed what the model saw


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "llama"])
def test_sampled_logprobs_equal_a_plain_forward(arch, tokenizer):
    model = tiny_model(arch)
    torch.manual_seed(0)
    batch = FastGenerator(model, tokenizer, batch_size=3).generate(_prompts(tokenizer), 2, 150, temperature=1.5)
    assert batch.completion_lengths.min() < batch.completion_lengths.max()  # rows end at different steps
    plain = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                                batch.completion_mask, temperature=1.5)
    assert (batch.logprobs[batch.completion_mask == 0] == 0).all()
    assert torch.allclose(batch.logprobs, plain, atol=1e-4)  # float32 on CPU; bench/ measures bf16 on a GPU


def test_after_eos_rows_are_padding_and_the_loop_stops_early(tokenizer):
    model = tiny_model("qwen2")
    with torch.no_grad():  # make EOS (id 1) the only likely token after the first step
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[1] = 50.0
    batch = FastGenerator(model, tokenizer).generate(_prompts(tokenizer), 2, 200, temperature=1.0)
    assert batch.completion_lengths.tolist() == [1] * 6
    assert batch.input_ids.shape[1] - batch.prompt_length <= 16  # stopped at the first all-finished check
    assert not batch.truncated.any()
    # benchmarks force fixed lengths: EOS is never drawn, in both engines alike
    fixed = [engine(model, tokenizer, ignore_eos=True).generate(_prompts(tokenizer), 1, 30, temperature=0.0)
             for engine in (FastGenerator, HFGenerator)]
    assert fixed[0].completion_lengths.tolist() == [30] * 3 and torch.equal(fixed[0].input_ids, fixed[1].input_ids)


def _eos_likely(model, bias: float):
    with torch.no_grad():  # EOS (id 1) likely enough that rows end over a wide range of steps
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[1] = bias
    return model


def test_finished_rows_are_dropped_from_the_batch_without_changing_a_sample(tokenizer):
    model = _eos_likely(tiny_model("llama"), 2.0)
    prompts = _prompts(tokenizer, ("abc", "x y z qq", "12", "hello"))
    kept = FastGenerator(model, tokenizer, compact=False)
    whole = kept.generate(prompts, 4, 100, temperature=1.0, seeds=[7])
    compacting = FastGenerator(model, tokenizer)
    batch = compacting.generate(prompts, 4, 100, temperature=1.0, seeds=[7])
    assert batch.texts == whole.texts and torch.equal(batch.completion_mask, whole.completion_mask)
    assert torch.equal(batch.truncated, whole.truncated)
    assert torch.allclose(batch.logprobs, whole.logprobs, atol=1e-5)
    # every decode step of the whole batch decodes all 16 rows; compacting (on a CPU: no graphs to capture), each
    # check (every 16 steps) keeps only the rows still going, unless fewer than 16 steps are left
    lengths = whole.completion_lengths.tolist()
    assert sorted(lengths)[7] <= 16 < max(lengths) == 100  # some end early, one runs to the cap
    assert kept.stats == {"row_steps": 99 * 16, "compactions": 0}
    rows, row_steps, compactions = 16, 0, 0
    for done in range(1, 100):
        going = sum(n > done for n in lengths)
        if done % 16 == 0 and going < rows and 100 - done >= 16:
            rows, compactions = going, compactions + 1
        row_steps += rows
    assert compactions >= 3 and compacting.stats == {"row_steps": row_steps, "compactions": compactions}
    # at most half still going (the rule with CUDA graphs): fewer compactions, the same samples
    halving = FastGenerator(model, tokenizer, compact_below=0.5)
    assert halving.generate(prompts, 4, 100, temperature=1.0, seeds=[7]).texts == whole.texts
    rows, row_steps, compactions = 16, 0, 0
    for done in range(1, 100):
        going = sum(n > done for n in lengths)
        if done % 16 == 0 and going < rows and going <= rows / 2 and 100 - done >= 16:
            rows, compactions = going, compactions + 1
        row_steps += rows
    assert 1 <= compactions < compacting.stats["compactions"]
    assert halving.stats == {"row_steps": row_steps, "compactions": compactions}
    # the next call starts again from the whole batch, on the state it keeps: other prompts, longer, another seed
    others = _prompts(tokenizer, ("qq", "a b", "zz top", "7+8"))
    again = compacting.generate(others, 4, 120, temperature=1.0, seeds=[9])
    fresh = FastGenerator(model, tokenizer, compact=False).generate(others, 4, 120, temperature=1.0, seeds=[9])
    assert compacting.stats["compactions"] >= 1 and again.texts == fresh.texts and compacting.state.rows == 16


@pytest.mark.parametrize("arch, options, sampling", [
    ("mistral", {"sliding_window": 5}, {}), ("gemma2", {"sliding_window": 5}, {}), ("gpt2", {}, {}),
    ("qwen3", {}, {"top_p": 0.8}), ("llama", {}, {"temperature": 0.0}), ("llama", {"batch_size": 5}, {})])
def test_compaction_changes_no_sample_of_any_architecture_or_setting(arch, options, sampling, tokenizer):
    model = _eos_likely(tiny_model(arch), 2.0)
    for key, value in options.items():
        if key != "batch_size":
            setattr(model.config, key, value)
    batch_size = {"batch_size": options.get("batch_size", 256)}
    prompts = _prompts(tokenizer, ("abc", "x y z qq", "12", "hello"))
    kwargs = {"temperature": 1.0, "seeds": [4], **sampling}
    compacting = FastGenerator(model, tokenizer, **batch_size)
    batch = compacting.generate(prompts, 4, 100, **kwargs)
    whole = FastGenerator(model, tokenizer, compact=False, **batch_size).generate(prompts, 4, 100, **kwargs)
    assert compacting.stats["compactions"] >= 1
    assert batch.texts == whole.texts and torch.equal(batch.completion_mask, whole.completion_mask)
    assert torch.allclose(batch.logprobs, whole.logprobs, atol=1e-5)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_steps_of_a_compacting_batch_sample_what_eager_steps_sample(tokenizer):
    model = _eos_likely(tiny_model("llama"), 2.0).cuda()
    prompts = _prompts(tokenizer, ("abc", "x y z qq", "12", "hello"))
    kwargs = {"temperature": 1.0, "seeds": [7]}
    eager = FastGenerator(model, tokenizer, cuda_graphs=False, kernels=False, compact=False).generate(
        prompts, 4, 100, **kwargs)
    captured = FastGenerator(model, tokenizer, cuda_graphs=True, kernels=False, compact=True)
    for _ in range(2):  # the second call replays the whole batch's steps and captures the compacted ones anew
        batch = captured.generate(prompts, 4, 100, **kwargs)
        assert captured.stats["compactions"] >= 1
        assert batch.texts == eager.texts and torch.equal(batch.completion_mask, eager.completion_mask)
        assert torch.allclose(batch.logprobs, eager.logprobs, atol=1e-5)

def test_when_a_batch_is_compacted_by_hand():
    from onelayer.rollout.fast import CHECK_EVERY, compact_now

    assert CHECK_EVERY == 16
    assert compact_now(8, 16, 50, 0.5) and not compact_now(9, 16, 50, 0.5)  # at most half still going
    assert compact_now(15, 16, 16, 1.0) and not compact_now(15, 16, 15, 1.0)  # a check's worth of steps left
    assert not compact_now(16, 16, 80, 1.0)  # nothing finished: nothing to drop
    assert compact_now(1, 2, 80, 0.5) and not compact_now(0, 0, 80, 1.0)


def test_compaction_is_on_where_it_cannot_cost_captures(tokenizer):
    model = tiny_model("llama")
    eager = FastGenerator(model, tokenizer)
    assert eager.compact and eager.compact_below == 1.0  # fewer rows, nothing to capture: at every check
    graphs = FastGenerator(model, tokenizer, cuda_graphs=True)
    assert not graphs.compact and graphs.compact_below == 0.5  # each compaction would capture anew
    assert FastGenerator(model, tokenizer, cuda_graphs=True, compact=True).compact
    assert FastGenerator(model, tokenizer, cuda_graphs=True, compact=True, compact_below=1.0).compact_below == 1.0
    assert not FastGenerator(model, tokenizer, compiled=True, compact=True).compact  # each shape compiles again


def test_nucleus_by_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert nucleus_mask(probs, 0.7).tolist() == [[False, True, False, True]]  # 0.5 + 0.3 reaches 0.7
    assert nucleus_mask(probs, 0.85).tolist() == [[True, True, False, True]]
    assert nucleus_mask(probs, 0.4).tolist() == [[False, True, False, False]]  # the top token always stays


def test_sampled_frequencies_match_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40_000
    logits = probs.log().expand(n, -1) * 2.0  # temperature 2 undoes the doubling
    tokens, logprobs = sample_tokens(logits, temperature=2.0, top_p=1.0)
    counts = torch.bincount(tokens, minlength=4).double()
    assert chisquare(counts.numpy(), (probs.double() / probs.double().sum() * n).numpy()).pvalue > 1e-3
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)
    # top-p 0.7 keeps {0.5, 0.3} and renormalises them; log-probs stay those of the full distribution
    tokens, logprobs = sample_tokens(probs.log().expand(n, -1), temperature=1.0, top_p=0.7)
    counts = torch.bincount(tokens, minlength=4).double()
    assert counts[2] == 0 and counts[3] == 0
    assert chisquare(counts[:2].numpy(), [n * 0.5 / 0.8, n * 0.3 / 0.8]).pvalue > 1e-3
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-5)
    tokens, logprobs = sample_tokens(logits, temperature=0.0, top_p=1.0)
    assert (tokens == 0).all() and torch.allclose(logprobs, (logits[0]).log_softmax(-1)[0].expand(n))


def test_first_tokens_follow_the_model(tokenizer):
    """End to end: the engine's first sampled tokens have the model's next-token distribution."""
    model = tiny_model("qwen3")
    prompt = _prompts(tokenizer, ["hello"])
    n = 6000
    torch.manual_seed(1)
    batch = FastGenerator(model, tokenizer, batch_size=n).generate(prompt, n, 1, temperature=1.0)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    probs = model(ids).logits[0, -1].float().softmax(-1).detach().double()
    counts = torch.bincount(batch.input_ids[:, -1], minlength=probs.shape[0]).double()
    likely = probs * n >= 5  # chi-square needs enough expected counts: pool the rest
    observed = torch.cat([counts[likely], counts[~likely].sum()[None]])
    expected = torch.cat([probs[likely], probs[~likely].sum()[None]]) * n
    assert likely.sum() >= 5
    assert chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue > 1e-3


def test_state_is_reused_and_rebuilt_when_weights_move(tokenizer):
    model = tiny_model("llama")
    gen = FastGenerator(model, tokenizer)
    gen.generate(_prompts(tokenizer), 1, 8, temperature=0.0)
    state = gen.state
    gen.generate(_prompts(tokenizer, ["ab", "c", "d"]), 1, 8, temperature=0.0)
    assert gen.state is state  # same rows, fits the cache: nothing reallocated
    layer = model.model.layers[1].mlp.up_proj
    layer.weight.data = layer.weight.data.clone()  # e.g. trained tensors cast to float32
    gen.generate(_prompts(tokenizer, ["ab", "c", "d"]), 1, 8, temperature=0.0)
    assert gen.state is not state
    state = gen.state
    gen.generate(_prompts(tokenizer, ["ab", "c", "d"]), 1, 8, temperature=0.5)  # other sampling settings
    assert gen.state is not state


@pytest.mark.parametrize("compiled", [False, True])
def test_a_released_state_is_freed_at_once(tokenizer, compiled):
    import gc
    import weakref

    gen = FastGenerator(tiny_model("llama"), tokenizer, compiled=compiled)
    gen.generate(_prompts(tokenizer), 1, 4, temperature=0.0)
    state = weakref.ref(gen.state)
    gc.disable()  # freed by reference counting, not whenever the collector runs (a cycle would keep its cache)
    try:
        gen.release()
        assert state() is None
    finally:
        gc.enable()


def test_mixed_precision_is_as_accurate_as_transformers_in_bf16(tokenizer):
    """A bf16 model with one float32 trained layer (as training leaves it) samples under bf16 autocast;
    its log-probs are as close to the float32 model's as transformers' own bf16 forward is."""
    exact = tiny_model("qwen3")
    model = tiny_model("qwen3").to(torch.bfloat16)
    model.model.layers[2].float()
    torch.manual_seed(0)
    batch = FastGenerator(model, tokenizer).generate(_prompts(tokenizer), 2, 40, temperature=1.0)
    args = (batch.input_ids, batch.attention_mask, batch.prompt_length, batch.completion_mask)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = completion_logprobs(model, *args)
        reference = completion_logprobs(exact, *args)
    where = batch.completion_mask.bool()
    fast_error = (batch.logprobs - reference)[where].abs().mean()
    plain_error = (plain - reference)[where].abs().mean()
    assert 0 < fast_error < 1.25 * plain_error


def test_engine_choice(tokenizer, capsys, monkeypatch):
    model = tiny_model("llama")
    assert isinstance(make_generator(model, tokenizer), HFGenerator)  # auto on CPU: the plain path
    assert isinstance(make_generator(model, tokenizer, engine="fast"), FastGenerator)
    assert isinstance(make_generator(model, tokenizer, engine="plain"), HFGenerator)
    monkeypatch.setattr("onelayer.rollout.fast.ARCHITECTURES", frozenset({"qwen3"}))
    assert isinstance(make_generator(model, tokenizer, engine="fast"), HFGenerator)
    notice = capsys.readouterr().err.strip()
    assert "architecture 'llama'" in notice and "transformers generate" in notice and "\n" not in notice
    with pytest.raises(OneLayerError, match="unknown rollout engine 'vllm': use auto, fast, plain"):
        make_generator(model, tokenizer, engine="vllm")


def test_a_rows_samples_do_not_depend_on_its_batch(tokenizer):
    """Counter-based streams: the same seed gives the same completions whether rows are generated in
    one batch, in batches of one, or as one block among blocks of other seeds."""
    model = tiny_model("llama")
    prompts = _prompts(tokenizer)
    alone = FastGenerator(model, tokenizer, batch_size=6).generate(prompts, 2, 40, temperature=1.0, seeds=[7])
    one_by_one = FastGenerator(model, tokenizer, batch_size=1).generate(prompts, 2, 40, temperature=1.0, seeds=[7])
    blocks = FastGenerator(model, tokenizer, batch_size=4).generate(prompts * 3, 2, 40, temperature=1.0,
                                                                    seeds=[3, 7, 9])
    assert alone.texts == one_by_one.texts == blocks.texts[6:12]
    assert blocks.texts[:6] != alone.texts and blocks.texts[12:] != alone.texts  # other seeds, other samples
    assert torch.allclose(blocks.rows(slice(6, 12)).logprobs, alone.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="equal blocks"):
        FastGenerator(model, tokenizer).generate(prompts, 1, 5, seeds=[1, 2])


def test_streams_are_uniform_and_independent():
    from onelayer.rollout.streams import row_keys, uniforms

    keys = row_keys([0, 1, 2**40 + 3], 2000)
    assert len(set(keys.tolist())) == keys.numel()
    draws = torch.stack([uniforms(keys, torch.tensor([t])) for t in range(50)])
    assert 0 < draws.min() and draws.max() < 1
    assert abs(draws.mean().item() - 0.5) < 0.01 and abs(draws.std().item() - 12 ** -0.5) < 0.01
    assert abs(torch.corrcoef(draws[:2])[0, 1].item()) < 0.05  # successive steps of the same rows


def test_compiled_decode_samples_what_eager_decode_samples(tokenizer):
    # float64: compiled kernels sum in another order than eager ones, and in float32 a row's uniform can land
    # within that rounding of a boundary of the cumulative distribution and draw the neighbouring token (this
    # test failed that way once in two full runs); in float64 that rounding is ~1e-16, far below any gap here
    model = tiny_model("llama").double()
    prompts = _prompts(tokenizer)
    eager = FastGenerator(model, tokenizer).generate(prompts, 3, 30, temperature=1.0, seeds=[5])
    generator = make_generator(model, tokenizer, engine="fast", compile_decode=True)
    assert generator.compiled
    fused = generator.generate(prompts, 3, 30, temperature=1.0, seeds=[5])
    assert torch.equal(fused.input_ids, eager.input_ids)
    assert torch.allclose(fused.logprobs, eager.logprobs, atol=1e-10)
