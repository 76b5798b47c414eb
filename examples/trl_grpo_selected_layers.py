"""GRPO with TRL's GRPOTrainer on the layers onelayer selects, everything else frozen.

    python examples/trl_grpo_selected_layers.py                          # SmolLM2-135M, layer 14, 50 steps (GPU)
    python examples/trl_grpo_selected_layers.py --select top:4@scans/arith --lr-from scans/arith
    python examples/trl_grpo_selected_layers.py --model ./tiny --task toy:repeat --max-steps 2   # a smoke test

The reward is the onelayer task's own verifier; the prompts are rendered with the model's chat template
(when it has one) into plain text, TRL's "standard" format. After training, the trained tensors are saved
as a onelayer checkpoint (a few MB for one layer), which ``onelayer eval`` scores:

    onelayer eval --checkpoint trl-out/checkpoint --task rg:basic_arithmetic --task-option max_terms=2 ...

Needs ``pip install trl`` (tested with trl 1.16).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import onelayer
from onelayer.models import load_model, load_tokenizer
from onelayer.rollout import render_prompts
from onelayer.tasks import get_task

# The task of the committed GPU scans: sums and differences of two small numbers.
EASY_ARITHMETIC = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+", "-"],
                   "allow_parentheses": False, "allow_negation": False}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="hub id, local directory, .gguf file or 'smollm2'")
    parser.add_argument("--select", default="14", help="onelayer layer spec (default: 14)")
    parser.add_argument("--lr-from", default="", help="scan dir or profile.json: per-layer learning rates")
    parser.add_argument("--task", default="rg:basic_arithmetic", help="onelayer task whose verifier is the reward")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt (TRL's num_generations)")
    parser.add_argument("--max-completion-length", type=int, default=96)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--out", default="trl-out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Train and save; returns the onelayer checkpoint's directory."""
    import trl
    from datasets import Dataset

    args = parse_args(argv)
    rows = args.prompts_per_step * args.group_size
    if rows % args.gradient_accumulation_steps:
        raise SystemExit(f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the {rows} "
                         "completions of a step")
    cuda = torch.cuda.is_available()
    # float32 weights: Adam's small steps vanish in bfloat16 ones; bf16=True below computes in bf16 on a GPU.
    # load_model also unmarks a GGUF model as quantized (transformers keeps the flag after dequantizing,
    # and Trainer then refuses to train it).
    model = load_model(args.model, "cuda" if cuda else "cpu", dtype="fp32")
    tokenizer = load_tokenizer(args.model)
    task = get_task(args.task, EASY_ARITHMETIC if args.task == "rg:basic_arithmetic" else {})
    examples = task.examples("train")[:args.max_steps * args.prompts_per_step]
    prompts = render_prompts(tokenizer, [task.messages(e) for e in examples])
    data = Dataset.from_dict({"prompt": prompts, "index": list(range(len(examples)))})

    def reward(prompts, completions, index, **_):
        return [task.score(text, examples[i]).reward for text, i in zip(completions, index, strict=True)]

    kept = onelayer.select_layers(model, args.select)  # freezes everything else
    print(kept)
    for note in kept.notes:
        print(f"note: {note}")
    optimizer = torch.optim.AdamW(kept.param_groups(args.lr, lr_from=args.lr_from or None))
    config = trl.GRPOConfig(
        output_dir=args.out, per_device_train_batch_size=rows // args.gradient_accumulation_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_generations=args.group_size, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, lr_scheduler_type="constant", beta=0.0, temperature=1.0, max_steps=args.max_steps,
        logging_steps=1, save_strategy="no", report_to="none", bf16=cuda, use_cpu=not cuda, seed=0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, optimizers=(optimizer, None))
    trainer.train()
    checkpoint = kept.save(Path(args.out) / "checkpoint", base_model=args.model, step=args.max_steps)
    print(f"trained tensors of layers {kept.selection.describe()} saved in {checkpoint}: onelayer eval --checkpoint "
          f"{checkpoint} --task {args.task}")
    return checkpoint


if __name__ == "__main__":
    main()
