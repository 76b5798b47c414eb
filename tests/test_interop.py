"""onelayer's selection in other trainers: the Python API on a loaded model, TRL's GRPOTrainer on a model it
prepared, and the selection exported as parameter names, regular expressions and PEFT options."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import onelayer
from onelayer.checkpoint import apply_checkpoint, read_meta
from onelayer.cli import main
from onelayer.errors import OneLayerError
from onelayer.interop import NOTHING, all_parameter_layers, frozen_regex, peft_options, trainable_regex
from onelayer.layers import apply_selection, parse_layer_spec, select_layers

from .test_strategies import hand_profile, write_profile
from .tiny import ARCHS, tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_selected_layers.py"

# tiny llama (tests/tiny.py): hidden 32, MLP 64, 4 query and 2 key/value heads of 8, vocabulary 84, tied head
LLAMA_LAYER = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q, o; k, v; gate, up, down; two norms = 9280
LLAMA_EMBED = 84 * 32


def test_select_layers_freezes_everything_else_and_says_what_it_kept():
    model = tiny_model("llama")
    kept = onelayer.select_layers(model, "1,3,norm")
    assert kept.layers == (1, 3) and kept.extras == ("norm",)
    assert kept.parameters == 2 * LLAMA_LAYER + 32 and kept.counts["total"] == 4 * LLAMA_LAYER + LLAMA_EMBED + 32
    assert kept.counts["per_layer"] == {"1": LLAMA_LAYER, "3": LLAMA_LAYER, "norm": 32}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert kept.names == trainable and len(trainable) == 2 * 9 + 1
    assert all(n.startswith(("model.layers.1.", "model.layers.3.")) or n == "model.norm.weight" for n in trainable)
    assert str(kept).startswith("layers 1,3, norm: 18,592 of 39,840 parameters trainable")


def test_select_layers_head_of_a_tied_model_trains_the_embedding_it_shares():
    model = tiny_model("llama")
    kept = onelayer.select_layers(model, "head")
    assert kept.names == ["model.embed_tokens.weight"] and model.lm_head.weight.requires_grad


@pytest.mark.parametrize("spec,message", [("none", "selects nothing"), ("9", "layer 9 is out of range")])
def test_select_layers_refuses_a_spec_that_trains_nothing_or_is_out_of_range(spec, message):
    model = tiny_model("llama")
    with pytest.raises(OneLayerError, match=message):
        onelayer.select_layers(model, spec)
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen by a refused spec


def test_param_groups_carry_the_contribution_guided_learning_rates(tmp_path):
    model = tiny_model("llama")
    kept = onelayer.select_layers(model, "1,3,norm")
    scan = write_profile(tmp_path / "scan", hand_profile({0: 0.5, 1: 0.2, 2: 0.1, 3: 0.6}, 4))
    groups = kept.param_groups(1e-3, lr_from=scan, weight_decay=0.1)
    lrs = {(g["layer"], g["weight_decay"]): g["lr"] for g in groups}
    # max(C, 0) / mean over the trained layers: 0.2 / 0.4 = 0.5 and 0.6 / 0.4 = 1.5; the final norm keeps 1
    assert lrs == pytest.approx({(1, 0.1): 5e-4, (1, 0.0): 5e-4, (3, 0.1): 1.5e-3, (3, 0.0): 1.5e-3, ("norm", 0.0): 1e-3})
    assert sorted(n for g in groups for n in g["names"]) == sorted(kept.names)
    assert {len(g["params"]) for g in groups if g["weight_decay"] == 0.1} == {7}  # matrices decay, norms do not
    plain = kept.param_groups(1e-3)
    assert {g["lr"] for g in plain} == {1e-3}
    torch.optim.AdamW(groups)  # a torch optimizer takes them as they are


# -------------------------------------------------------------------------------------------------- TRL


def test_trl_grpo_trainer_trains_only_the_selected_layers_and_the_result_loads_back(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kept = onelayer.select_layers(model, "1,3")
    scan = write_profile(tmp_path / "scan", hand_profile({0: 0.5, 1: 0.2, 2: 0.1, 3: 0.6}, 4))
    optimizer = torch.optim.AdamW(kept.param_groups(1e-2, lr_from=scan))

    def reward(completions, **_):  # varied rewards within each group, so GRPO's advantages are not zero
        return [c.count("a") + 0.1 * len(set(c)) for c in completions]

    config = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                            max_completion_length=8, max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                            logging_steps=1,
                            save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"] * 2}),
                              optimizers=(optimizer, None))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(kept.names)  # every selected tensor moved, no other one
    # the per-layer learning rates reached TRL's optimizer through its scheduler: 1e-2 x 0.5 and x 1.5
    assert {g["layer"]: g["lr"] for g in trainer.optimizer.param_groups} == pytest.approx({1: 5e-3, 3: 1.5e-2})

    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in loaded.named_parameters())
    kept.save(tmp_path / "ckpt", base_model="tiny", step=2)
    fresh = tiny_model("llama")  # the same base weights
    apply_checkpoint(fresh, tmp_path / "ckpt")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())
    meta = read_meta(tmp_path / "ckpt")
    assert meta["layers"] == [1, 3] and meta["base_model"] == "tiny" and meta["trained"] == kept.names


def test_the_trl_example_trains_its_selection_and_saves_a_checkpoint(tmp_path, saved_tiny):
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("trl_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    checkpoint = example.main(["--model", str(saved_tiny), "--task", "toy:repeat", "--select", "2", "--lr", "1e-2",
                               "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "4",
                               "--max-completion-length", "6", "--out", str(tmp_path / "out")])
    meta = read_meta(checkpoint)
    assert meta["layers"] == [2] and meta["step"] == 1 and all(n.startswith("model.layers.2.") for n in meta["trained"])
    base = tiny_model("llama")
    trained = tiny_model("llama")
    apply_checkpoint(trained, checkpoint)
    moved = {n for (n, a), b in zip(base.named_parameters(), trained.parameters(), strict=True) if not torch.equal(a, b)}
    assert moved and moved <= set(meta["trained"])


# ------------------------------------------------------------------------------------------ regex export

SPECS = ["1", "0,2", "all", "embed", "head", "norm", "1,head,norm", "all,embed,head,norm", "3,embed", "none"]


@pytest.mark.parametrize("arch", ARCHS)
def test_regexes_match_exactly_the_trained_or_the_frozen_parameter_names(arch):
    model = tiny_model(arch)
    for spec in SPECS:
        selection = select_layers(model, spec)
        apply_selection(model, selection)
        # every name, tied aliases too (lm_head.weight of a tied model): requires_grad is apply_selection's answer
        names = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        trained, frozen = trainable_regex(model, selection), frozen_regex(model, selection)
        for prefix in ("", "module.", "base_model.model.", "_orig_mod."):  # as DDP, PEFT, torch.compile name them
            assert {n: bool(re.search(trained, prefix + n)) for n in names} == names, (spec, trained)
            assert {n: not re.search(frozen, prefix + n) for n in names} == names, (spec, frozen)
        # a module the freeze pattern matches holds frozen tensors only (verl freezes by module too)
        for name, module in model.named_modules():
            if name and re.search(frozen, name):
                assert not any(p.requires_grad for p in module.parameters()), (spec, name)


def test_regexes_are_the_short_expressions_documented():
    model = tiny_model("llama")  # tied head
    assert trainable_regex(model, select_layers(model, "0,2")) == r"(?:^|\.)(?:model\.layers\.(?:0|2))(?:\.|$)"
    assert frozen_regex(model, select_layers(model, "0,2")) == \
        r"(?:^|\.)(?:model\.layers\.(?:1|3)|model\.embed_tokens|model\.norm|lm_head)(?:\.|$)"
    assert trainable_regex(model, select_layers(model, "3")) == r"(?:^|\.)(?:model\.layers\.3)(?:\.|$)"
    assert trainable_regex(model, select_layers(model, "none")) == NOTHING
    assert frozen_regex(model, select_layers(model, "all,embed,norm")) == NOTHING
    assert not re.search(NOTHING, "") and not re.search(NOTHING, "model.layers.0.mlp.up_proj.weight")


def test_verl_style_freezing_by_the_freeze_pattern_leaves_the_selection_trainable():
    model = tiny_model("qwen3")
    selection = parse_layer_spec("1-2,head", 4)
    pattern = re.compile(frozen_regex(model, selection))
    for name, param in model.named_parameters():  # what verl's freeze_module_pattern does before wrapping
        if pattern.search(name):
            param.requires_grad_(False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n in all_parameter_layers(model) if n.startswith(("model.layers.1.", "model.layers.2.", "lm_head."))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_options_adapt_the_selected_layers_only(arch):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch)
    selection = select_layers(model, "1,3,norm")
    options = peft_options(model, selection)
    blocks, final_norm = {"llama": ("layers", "model.norm"), "gpt2": ("h", "transformer.ln_f")}[arch]
    assert options["layers_to_transform"] == [1, 3] and options["layers_pattern"] == blocks
    assert options["modules_to_save"] == [final_norm]
    peft_model = get_peft_model(model, LoraConfig(r=2, **options))
    adapted = {n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n}
    layers = {int(re.search(rf"\.{blocks}\.(\d+)\.", n)[1]) for n in adapted}
    assert layers == {1, 3}
    # every linear map of those layers got an adapter (attention and MLP alike)
    per_layer = {n.split(f".{blocks}.1.")[1].split(".lora_")[0] for n in adapted if f".{blocks}.1." in n}
    assert {name.rsplit(".", 1)[-1] for name in per_layer} == set(options["target_modules"])
    assert len(options["target_modules"]) == {"llama": 7, "gpt2": 3}[arch]


def test_peft_options_refuse_a_selection_without_decoder_layers():
    model = tiny_model("llama")
    with pytest.raises(OneLayerError, match="selects no decoder layer"):
        peft_options(model, select_layers(model, "embed"))


# ------------------------------------------------------------------------------------------------- CLI


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_layers_formats_for_other_trainers(capsys, saved_tiny):
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--format", "names")
    assert code == 0 and out.split() == [f"model.layers.1.{n}" for n in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")] + ["model.norm.weight"]
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--format", "regex")
    assert code == 0 and out.strip() == r"(?:^|\.)(?:model\.layers\.1|model\.norm)(?:\.|$)"
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--format", "freeze-regex")
    assert code == 0 and out.strip() == r"(?:^|\.)(?:model\.layers\.(?:0|2|3)|model\.embed_tokens|lm_head)(?:\.|$)"
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--format", "peft")
    assert code == 0 and json.loads(out)["layers_to_transform"] == [1] and json.loads(out)["layers_pattern"] == "layers"
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--format", "json")
    report = json.loads(out)
    assert report["layers"] == [1] and report["regex"].startswith("(?:^|") and len(report["names"]) == 10
    assert report["peft"]["modules_to_save"] == ["model.norm"] and report["freeze_regex"] != report["regex"]
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "1,norm", "--json")
    assert code == 0 and json.loads(out) == report


def test_layers_peft_format_without_decoder_layers_is_a_one_line_error(capsys, saved_tiny):
    code, out, err = run(capsys, "layers", saved_tiny, "--select", "embed", "--format", "peft")
    assert code == 2 and out == "" and err.startswith("error: layer spec 'embed' selects no decoder layer")
    code, out, _ = run(capsys, "layers", saved_tiny, "--select", "embed", "--format", "json")
    assert code == 0 and json.loads(out)["peft"] is None
