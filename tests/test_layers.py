import pytest
import torch

from onelayer.errors import OneLayerError
from onelayer.layers import apply_selection, parameter_counts, parse_layer_spec, select_layers
from onelayer.models import parameter_layers

from .tiny import tiny_model


@pytest.mark.parametrize("spec,n,expected", [
    ("all", 4, [0, 1, 2, 3]),
    ("none", 4, []),
    ("7", 30, [7]),
    ("3,7,11", 30, [3, 7, 11]),
    ("10-19", 30, list(range(10, 20))),
    ("middle:1", 30, [14]),
    ("middle:4", 30, [13, 14, 15, 16]),
    ("middle:10", 30, list(range(10, 20))),
    ("middle:2", 5, [1, 2]),
    ("middle:3", 28, [12, 13, 14]),
    ("middle:30", 30, list(range(30))),
    ("frac:0.33-0.66", 30, list(range(10, 20))),
    ("frac:0-1", 4, [0, 1, 2, 3]),
    # both ends are inclusive: layer centres (l + 0.5) / 4 are 0.125, 0.375, 0.625, 0.875 (exact in binary)
    ("frac:0.125-0.375", 4, [0, 1]),
    ("frac:0.375-0.625", 4, [1, 2]),
    ("frac:0.376-0.874", 4, [2]),
    ("frac:0.5-1", 4, [2, 3]),
    ("every:3", 10, [0, 3, 6, 9]),
    ("every:1", 3, [0, 1, 2]),
    ("0, 2-3 ,middle:1", 8, [0, 2, 3]),
    ("1,1,1-2", 4, [1, 2]),
])
def test_spec_selects_exact_layers(spec, n, expected):
    assert list(parse_layer_spec(spec, n).layers) == expected


def test_extras():
    sel = parse_layer_spec("head,3,embed", 4)
    assert sel.layers == (3,) and sel.extras == ("embed", "head")
    assert sel.describe() == "3, embed, head"
    assert parse_layer_spec("1-2,3,7", 8).describe() == "1-3,7"


@pytest.mark.parametrize("spec,message", [
    ("30", "layer 30 is out of range; layers are 0-29"),
    ("5-40", "out of range"),
    ("9-3", "start <= end"),
    ("middle:0", "middle:k needs 1 <= k <= 30"),
    ("middle:31", "middle:k needs"),
    ("frac:0.7-0.2", "0 <= a <= b <= 1"),
    ("frac:0.501-0.502", "widen it"),
    ("every:0", "every:n"),
    ("", "empty layer spec"),
    ("3,,4", "empty layer spec"),
    ("first", "not a layer index"),
    ("-1", "not a layer index"),
    ("best:3", "unknown form 'best:'"),
])
def test_bad_specs_get_one_line_errors(spec, message):
    with pytest.raises(OneLayerError, match=message.replace("(", r"\(")) as err:
        parse_layer_spec(spec, 30)
    assert "\n" not in str(err.value)
    if spec:
        assert "valid forms" in str(err.value)


def test_apply_selection_freezes_all_but_the_selection():
    model = tiny_model("qwen3")
    layer_of = parameter_layers(model)
    groups = apply_selection(model, select_layers(model, "1,3"), weight_decay=0.1, lr_scales={3: 0.5})
    for name, p in model.named_parameters():
        assert p.requires_grad == (layer_of[name] in (1, 3)), name
    by_layer = {(g["layer"], g["weight_decay"]): g for g in groups}
    assert set(by_layer) == {(1, 0.1), (1, 0.0), (3, 0.1), (3, 0.0)}
    assert by_layer[(3, 0.1)]["lr_scale"] == 0.5 and by_layer[(1, 0.1)]["lr_scale"] == 1.0
    assert all(p.ndim >= 2 for p in by_layer[(1, 0.1)]["params"])
    assert all(p.ndim == 1 for p in by_layer[(1, 0.0)]["params"])
    trained = {n for g in groups for n in g["names"]}
    assert trained == {n for n, layer in layer_of.items() if layer in (1, 3)}


def test_frozen_layers_still_pass_gradients():
    model = tiny_model("llama")
    apply_selection(model, select_layers(model, "0"))
    ids = torch.randint(3, 50, (2, 6))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None for n in grads if ".layers.0." in n)
    assert all(grads[n] is None for n in grads if ".layers.0." not in n)
    assert any(grads[n].abs().sum() > 0 for n in grads if ".layers.0." in n)


def test_tied_head_selects_the_embedding_matrix():
    model = tiny_model("llama")  # built with tie_word_embeddings=True
    apply_selection(model, select_layers(model, "head"))
    assert model.get_input_embeddings().weight.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]


def test_parameter_counts():
    model = tiny_model("qwen2")
    counts = parameter_counts(model, select_layers(model, "middle:2"))
    per_block = sum(p.numel() for n, p in model.named_parameters() if ".layers.1." in n)
    assert counts["per_layer"] == {"1": per_block, "2": per_block}
    assert counts["trainable"] == 2 * per_block
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_bad_lr_scale():
    model = tiny_model("llama")
    with pytest.raises(OneLayerError, match="finite and >= 0"):
        apply_selection(model, select_layers(model, "1"), lr_scales={1: float("nan")})


def test_selection_for_another_model_is_refused():
    with pytest.raises(OneLayerError, match="made for 30 layers"):
        apply_selection(tiny_model("llama"), parse_layer_spec("1", 30))
