import pytest
import torch

from onelayer.layers import apply_selection, select_layers
from onelayer.rollout import (
    HFGenerator,
    assemble_batch,
    completion_logprobs,
    completion_mask,
    encode_prompts,
    render_prompts,
)

from .tiny import ARCHS, tiny_model


def test_completion_mask_by_hand():
    completions = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask(completions, [1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_prompts_are_left_padded_and_repeated_per_sample(tokenizer):
    ids, mask = encode_prompts(tokenizer, ["ab", "abcd"], 2, torch.device("cpu"))
    a, b, c, d = (tokenizer.convert_tokens_to_ids(x) for x in "abcd")
    assert ids.tolist() == [[0, 0, a, b], [0, 0, a, b], [a, b, c, d], [a, b, c, d]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize("clean_up", [False, True])
def test_completion_texts_are_what_batch_decode_gives(tokenizer, clean_up):
    """The whole-batch decode (or, with clean-up on, transformers' own) stops at each row's first EOS."""
    tokenizer.clean_up_tokenization_spaces = clean_up
    try:
        ids, mask = encode_prompts(tokenizer, ["x", "y", "z"], 1, torch.device("cpu"))
        rows = [tokenizer("a b .c", add_special_tokens=False)["input_ids"] + [1, 5, 6],
                [1, 7, 8, 9, 10, 11], tokenizer("hi !?", add_special_tokens=False)["input_ids"][:6]]
        completions = torch.tensor([r + [0] * (9 - len(r)) for r in rows])
        batch = assemble_batch(tokenizer, ids, mask, completions, [1])
        # transformers' clean-up drops spaces before punctuation: the fast path must not skip it
        assert batch.texts == (["a b.c", "", "hi!?"] if clean_up else ["a b .c", "", "hi !?"])
        assert batch.texts == [tokenizer.decode(c[m.bool()], skip_special_tokens=True)
                               for c, m in zip(batch.input_ids[:, 1:], batch.completion_mask, strict=True)]
    finally:
        tokenizer.clean_up_tokenization_spaces = False


def _batch(tokenizer):
    prompts = ["abc", "hello there"]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(i)) + i + [10, 11, 12, 1] for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) + [1, 1, 1, 1] for i in ids])
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    attention[1, -2:] = 0
    return input_ids, attention, width, cmask


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_a_plain_forward(arch, tokenizer):
    model = tiny_model(arch)
    input_ids, attention, width, cmask = _batch(tokenizer)
    ours = completion_logprobs(model, input_ids, attention, width, cmask, chunk_tokens=2)
    for row in range(2):  # one row at a time: no padding, the model's own positions
        keep = attention[row].bool()
        logits = model(input_ids[row, keep][None]).logits.float()
        logp = logits.log_softmax(-1)[0, :-1].gather(-1, input_ids[row, keep][1:, None])[:, 0]
        n = int(cmask[row].sum())  # the row's completion tokens are the last n it attends to
        assert torch.allclose(ours[row, :n], logp[-n:], atol=1e-4)
    assert (ours[1, 2:] == 0).all()


def test_chunked_logprob_gradients_equal_unchunked(tokenizer):
    input_ids, attention, width, cmask = _batch(tokenizer)
    grads = []
    for chunk in (1, 1000):
        model = tiny_model("qwen3")
        apply_selection(model, select_layers(model, "2"))
        completion_logprobs(model, input_ids, attention, width, cmask, chunk_tokens=chunk).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_host_lengths_pick_the_tokens_the_mask_picks_with_the_same_gradients(tokenizer):
    input_ids, attention, width, cmask = _batch(tokenizer)
    out, grads = [], []
    for lengths in (None, torch.tensor([4, 2])):
        model = tiny_model("llama")
        apply_selection(model, select_layers(model, "1"))
        logp = completion_logprobs(model, input_ids, attention, width, cmask, chunk_tokens=3, lengths=lengths)
        (logp * torch.arange(1.0, 5.0)).sum().backward()  # a weight per position: a misplaced token shows
        out.append(logp.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.equal(out[0], out[1]) and (out[1][1, 2:] == 0).all()
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_micro_batches_are_cut_by_the_host_lengths(tokenizer):
    ids, mask = encode_prompts(tokenizer, ["x", "y", "z"], 1, torch.device("cpu"))
    completions = torch.tensor([[5, 6, 1, 0], [5, 1, 0, 0], [5, 6, 7, 8]])
    batch = assemble_batch(tokenizer, ids, mask, completions, [1])
    assert batch.lengths.tolist() == [3, 2, 4]  # read with the texts, not again per micro-batch
    part = batch.rows(torch.tensor([1, 0]))
    assert part.lengths.tolist() == [2, 3] and part.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert part.texts == [batch.texts[1], batch.texts[0]] and part.input_ids.shape[1] == batch.prompt_length + 3
    assert batch.rows(slice(1, 2)).completion_mask.shape[1] == 2
    batch.lengths = torch.tensor([3, 2, 2])  # the host copy decides where a micro-batch is trimmed
    assert batch.rows(slice(0, 3)).completion_mask.shape[1] == 3


def test_temperature_scales_the_logits(tokenizer):
    model = tiny_model("llama")
    input_ids, attention, width, cmask = _batch(tokenizer)
    hot = completion_logprobs(model, input_ids, attention, width, cmask, temperature=2.0)
    row = input_ids[0, attention[0].bool()][None]  # unpadded
    logits = model(row).logits[0, -5:-1] / 2.0
    expected = logits.log_softmax(-1).gather(-1, row[0, -4:, None])[:, 0]
    assert torch.allclose(hot[0], expected, atol=1e-5)


def test_greedy_generation_equals_generate(tokenizer):
    model = tiny_model("llama")
    gen = HFGenerator(model, tokenizer, batch_size=3)
    prompts = render_prompts(tokenizer, [[{"role": "user", "content": t}] for t in ("abc", "x y z", "12")])
    batch = gen.generate(prompts, num_samples=2, max_new_tokens=6, temperature=0.0)
    assert batch.size == 6 and batch.completion_mask.shape[1] <= 6
    assert torch.equal(batch.input_ids[0], batch.input_ids[1])  # greedy samples of one prompt agree
    for row, prompt in zip((0, 2, 4), prompts, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
        n = int(batch.completion_mask[row].sum())
        assert batch.input_ids[row, batch.prompt_length:batch.prompt_length + n].tolist() == ref[:n].tolist()
        assert batch.texts[row] == tokenizer.decode(ref[:n], skip_special_tokens=True)


def test_sampling_is_seeded_and_masks_after_eos(tokenizer):
    model = tiny_model("qwen2")
    gen = HFGenerator(model, tokenizer)
    torch.manual_seed(3)
    a = gen.generate(["ab"], 8, 10, temperature=1.0)
    torch.manual_seed(3)
    b = gen.generate(["ab"], 8, 10, temperature=1.0)
    assert torch.equal(a.input_ids, b.input_ids)
    completions = a.input_ids[:, a.prompt_length:]
    assert ((completions == 0) | a.completion_mask.bool()).all()  # beyond EOS only padding
    ends_in_eos = (completions * a.completion_mask).eq(1).any(dim=1)
    assert torch.equal(a.truncated, ~ends_in_eos)


def test_layer_selective_forward_is_lean(tokenizer):
    """Training one middle layer: the layers below it build no autograd graph, frozen weights get no
    gradients, and the backward pass keeps far fewer activations than training every layer."""
    input_ids, attention, width, cmask = _batch(tokenizer)

    def run(spec):
        model = tiny_model("llama")
        apply_selection(model, select_layers(model, spec))
        tracked = []
        for layer in model.model.layers:
            layer.register_forward_hook(lambda m, a, out: tracked.append(
                (out[0] if isinstance(out, tuple) else out).requires_grad))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            logp = completion_logprobs(model, input_ids, attention, width, cmask)
        logp.sum().backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        return tracked, sum(saved), grads

    tracked, saved_one, grads = run("2")
    assert tracked == [False, False, True, True]  # layers 0-1 ran without autograd
    assert grads and all(n.startswith("model.layers.2.") for n in grads)
    _, saved_all, _ = run("all")
    assert saved_one < 0.7 * saved_all
