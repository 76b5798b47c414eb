"""Held-out architectures: does onelayer train causal-LM families it was never written for?

    python bench/held_out.py --out bench-out/held-out                 # the families below, on the CPU
    python bench/held_out.py --out bench-out/held-out --families llama4_text,qwen3_next

For each family, a tiny random model is built from transformers' own config class (4 layers, width 32), saved
with the tests' character tokenizer, and trained for 2 GRPO steps of ``toy:repeat``: once on layer 1 alone and
once on every layer, each in a process of its own (a crash or a kill costs one family, not the sweep). A
single-layer run passes when its checkpoint holds every tensor of layer 1 and nothing else, and they moved (a tensor that no
gradient reached in 2 steps, such as an MoE expert no token was routed to, is counted, not failed). Written:
OUT/results.jsonl (a row per family) and OUT/results.md (the table). This checks wiring (layer discovery,
selection, log-probs, the update, the checkpoint), not speed or numerics: the fast engine runs only on the
architectures it was checked on (onelayer.rollout.fast.ARCHITECTURES) and the rest sample with ``generate``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# every family's config class is given these where it takes them
SIZES = dict(vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=1,
             head_dim=8, moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             n_routed_experts=4, shared_expert_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16,
             qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, first_k_dense_replace=1, n_group=1,
             topk_group=1, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8)
# what a family names differently, or needs for 4 layers to be valid
OVERRIDES = {
    "gptj": {"n_embd": 32, "n_layer": 4, "n_head": 4, "rotary_dim": 4, "n_positions": 256},
    "mpt": {"d_model": 32, "n_layers": 4, "n_heads": 4, "max_seq_len": 256},
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"num_key_value_heads": 4},
    "dots1": {"n_shared_experts": 1},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 16,
                         "layer_types": ["mamba", "attention", "mamba", "attention"]},
    "zamba2": {"layers_block_type": ["mamba", "hybrid", "mamba", "mamba"]},
}
FAMILIES = ("apertus arcee bitnet bloom cohere cohere2 deepseek_v2 deepseek_v3 diffllama doge dots1 ernie4_5 "
            "ernie4_5_moe exaone4 falcon falcon_h1 gemma gemma3_text gemma4_text glm glm4 glm4_moe gpt_bigcode "
            "gpt_neo gpt_oss gptj granite granitemoe granitemoehybrid helium hunyuan_v1_dense internlm3 jamba jetmoe "
            "lfm2 llama4_text mamba minimax ministral mistral mixtral mpt nemotron olmo olmo3 olmoe opt persimmon phi "
            "phimoe qwen2_moe qwen3_5_text qwen3_moe qwen3_next seed_oss smollm3 stablelm starcoder2 xglm "
            "zamba2").split()


def build(family: str, path: Path):
    """The family's tiny random causal LM and the tests' tokenizer, saved at ``path``."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.tiny import VOCAB, make_char_tokenizer

    config_class = transformers.CONFIG_MAPPING[family]
    takes = inspect.signature(config_class.__init__).parameters
    options = {k: v for k, v in {**SIZES, "vocab_size": VOCAB}.items() if k in takes}
    config = config_class(**{**options, **OVERRIDES.get(family, {})})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return model


def one(family: str, work: Path) -> dict:
    """Train ``family`` on layer 1 and on all layers; what happened, as a row."""
    import torch
    from safetensors.torch import load_file

    from onelayer import SamplingConfig, TrainConfig, train
    from onelayer.checkpoint import TENSORS
    from onelayer.errors import OneLayerError
    from onelayer.models import parameter_layers
    from onelayer.rollout.fast import unsupported_reason

    row = {"family": family}
    shutil.rmtree(work, ignore_errors=True)  # a run directory of an earlier sweep would resume
    try:
        model = build(family, work / "model")
        row["engine"] = "generate" if unsupported_reason(model) else "fast"
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for layers in ("1", "all"):
            config = TrainConfig(model=str(work / "model"), task="toy:repeat", layers=layers, steps=2,
                                 prompts_per_step=2, group_size=2, lr=1e-2, eval_n=4, save_every=0, device="cpu",
                                 dtype="fp32", out=str(work / f"run-{layers}"), sampling=SamplingConfig(max_new_tokens=6))
            train(config, progress=False)
            row[layers] = "trained"
        saved = load_file(work / "run-1" / "checkpoint" / TENSORS)
        layer_of = parameter_layers(model)
        row["layer_1_tensors"] = len(saved)
        row["other_layers"] = sorted({str(layer_of.get(n)) for n in saved} - {"1"})
        row["missing"] = sorted(n for n in before if layer_of[n] == 1 and n not in saved)
        row["unmoved"] = [n for n, t in saved.items() if torch.equal(t.float(), before[n].float())]
        # a tensor no gradient reached in 2 steps stays (an MoE expert no token was routed to, a gate at zero)
        row["ok"] = not row["other_layers"] and not row["missing"] and len(row["unmoved"]) < len(saved)
    except OneLayerError as error:
        row.update(ok=False, error=f"onelayer: {error}")
    except Exception as error:  # the point of the sweep: what breaks, and where
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/held-out")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--timeout", type=float, default=300, help="seconds per family")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one family
    args = parser.parse_args()
    out = Path(args.out)
    if args.one:
        print("ROW " + json.dumps(one(args.one, out / args.one)), flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family in args.families.split(","):
        start = time.perf_counter()
        try:
            child = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", family], text=True,
                                   capture_output=True, timeout=args.timeout)
            lines = [x for x in child.stdout.splitlines() if x.startswith("ROW ")]
            row = json.loads(lines[-1][4:]) if lines else {
                "family": family, "ok": False, "error": f"exit {child.returncode}: {child.stderr.strip()[-200:]}"}
        except subprocess.TimeoutExpired:
            row = {"family": family, "ok": False, "error": f"over {args.timeout:g} s"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(f"{family:18s} {'ok' if row['ok'] else 'FAIL'}  {row.get('error', '')}", flush=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import transformers

    table = ["| family | engine | layer 1 | all | layer-1 checkpoint | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        check = ""
        if "unmoved" in r:
            check = f"{r['layer_1_tensors']} tensors" + (f", of other layers too: {r['other_layers']}"
                                                         if r["other_layers"] else ", all of layer 1")
            check += f"; {len(r['missing'])} of layer 1 missing" if r["missing"] else ""
            check += f"; {len(r['unmoved'])} not moved" if r["unmoved"] else "; all moved"
        table.append(f"| {r['family']} | {r.get('engine', '')} | {r.get('1', 'no')} | {r.get('all', 'no')} | {check} "
                     f"| {r.get('error', '')} |")
    passed = sum(r["ok"] for r in rows)
    (out / "results.md").write_text(f"{passed} of {len(rows)} families pass (transformers "
                                    f"{transformers.__version__}).\n\n" + "\n".join(table) + "\n")
    print(f"{passed} of {len(rows)} families pass; {out / 'results.md'}")


if __name__ == "__main__":
    main()
