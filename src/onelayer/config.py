"""Typed configuration shared by the Python API and the CLI (which builds its flags from these)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass

from .errors import OneLayerError

ENGINES = ("auto", "fast", "plain")


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(default=256, metadata={"help": "completion length cap in tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    generation_batch_size: int = field(default=256, metadata={"help": "rows per generate() call"})
    engine: str = field(default="auto", metadata={
        "help": "rollout engine: auto (fast on CUDA where the architecture allows), fast (static KV cache, "
                "CUDA graphs on CUDA) or plain (transformers generate)"})
    compile_decode: bool = field(default=False, metadata={
        "help": "fuse the fast engine's decode step with torch.compile: on an H100, SmolLM2 generation 1.45x "
                "faster at batch 1024, after 30-40 s of compilation per batch shape (cached on disk); pays off in long "
                "runs"})
    fused_kernels: bool = field(default=True, metadata={
        "help": "the fast engine's decode attention and sampling as Triton kernels on CUDA GPUs (sm80+, Triton "
                "installed); --no-fused-kernels keeps torch ops"})

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise OneLayerError(f"unknown --engine '{self.engine}': use {', '.join(ENGINES)}")
        if self.generation_batch_size < 1:
            raise OneLayerError(f"--generation-batch-size must be >= 1, got {self.generation_batch_size}")


@dataclass
class TrainConfig:
    """One RL run: which model, task, algorithm and layers, for how long, written where."""

    model: str = field(default="smollm2", metadata={"help": "hub id, local dir, .gguf file or 'smollm2'"})
    task: str = field(default="rg:basic_arithmetic", metadata={"help": "task name, e.g. rg:basic_arithmetic"})
    task_options: dict = field(default_factory=dict, metadata={"help": "task option KEY=VALUE (repeatable)"})
    algo: str = field(default="grpo", metadata={"help": "grpo, dr_grpo or gigpo (agent tasks)"})
    layers: str = field(default="all", metadata={"help": "layer spec: all, 14, 3,7, 10-19, middle:4, ..."})
    out: str = field(default="runs/onelayer", metadata={"help": "run directory (resumed if it exists)"})
    steps: int = field(default=200, metadata={"help": "RL steps (rollout batches)"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts per step"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (tune it for full training)"})
    lr_from: str = field(default="", metadata={
        "help": "scan dir or profile.json: per-layer learning rates lr * max(C,0) / mean(max(C,0)) over the trained layers"})
    lora_rank: int = field(default=0, metadata={
        "help": "train LoRA adapters of this rank on the selected layers' linear maps instead of the layers; 0 = off"})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / rank)"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant or cosine, after warm-up"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm; 0 = off"})
    micro_batch_size: int = field(default=32, metadata={"help": "rows per forward/backward (accumulated)"})
    compile_layers: bool = field(default=False, metadata={
        "help": "update through torch.compile'd decoder layers (fused norms, rotary, activations): faster "
                "updates on a GPU after about a minute of compilation per process"})
    mini_batches: int = field(default=1, metadata={"help": "optimizer steps per PPO epoch"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch"})
    clip_low: float = field(default=0.2, metadata={"help": "PPO clip epsilon below 1"})
    clip_high: float = field(default=0.2, metadata={"help": "PPO clip epsilon above 1"})
    beta: float = field(default=0.0, metadata={"help": "KL weight to the initial policy (k3)"})
    gamma: float = field(default=0.95, metadata={"help": "GiGPO: discount of step returns"})
    step_weight: float = field(default=1.0, metadata={"help": "GiGPO: weight omega of step advantages"})
    loss_aggregation: str = field(default="", metadata={
        "help": "seq-mean-token-mean, token-mean or seq-mean-token-sum-norm; empty = the algorithm's"})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (and at 0 and the end); 0 = off"})
    eval_at_start: bool = field(default=True, metadata={"help": "with --eval-every, also evaluate before step 1"})
    eval_n: int = field(default=200, metadata={"help": "eval examples for periodic evaluation"})
    save_every: int = field(default=10, metadata={"help": "checkpoint every N steps (and at the end)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and init"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp32"})
    device: str = field(default="", metadata={"help": "cuda, cpu, cuda:1; empty = cuda if available"})
    attention: str = field(default="", metadata={
        "help": "attention implementation: sdpa, eager, flash_attention_2; empty = transformers' default"})

    def validate(self) -> None:
        positive = ("steps", "prompts_per_step", "group_size", "micro_batch_size", "mini_batches", "ppo_epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise OneLayerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise OneLayerError(f"--lr must be > 0, got {self.lr}")
        if self.lora_rank < 0:
            raise OneLayerError(f"--lora-rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise OneLayerError(f"--lr-schedule must be constant or cosine, got '{self.lr_schedule}'")
        if (self.prompts_per_step * self.group_size) % self.mini_batches:
            raise OneLayerError(f"--mini-batches {self.mini_batches} must divide the "
                                f"{self.prompts_per_step * self.group_size} rollouts of a step")
        if self.sampling.max_new_tokens < 1:
            raise OneLayerError("--max-new-tokens must be >= 1")
        if self.sampling.temperature <= 0:
            raise OneLayerError("training samples need --temperature > 0")
        if not 0 <= self.gamma <= 1:
            raise OneLayerError(f"--gamma must be in [0, 1], got {self.gamma}")
        self.sampling.validate()


@dataclass
class EvalConfig:
    """Evaluate a base model, or a base model plus a onelayer checkpoint, on a task's eval split."""

    model: str = field(default="", metadata={"help": "model; empty = the checkpoint's base model"})
    checkpoint: str = field(default="", metadata={"help": "run or checkpoint directory to apply"})
    task: str = field(default="rg:basic_arithmetic", metadata={"help": "task name"})
    task_options: dict = field(default_factory=dict, metadata={"help": "task option KEY=VALUE (repeatable)"})
    n: int = field(default=500, metadata={"help": "eval examples (the first n of the eval split)"})
    samples: int = field(default=1, metadata={"help": "completions per example (for pass@k)"})
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="", metadata={"help": "directory for results (summary and per-example)"})
    dtype: str = field(default="auto", metadata={"help": "auto, bf16 or fp32"})
    device: str = field(default="", metadata={"help": "cuda, cpu; empty = cuda if available"})
    attention: str = field(default="", metadata={
        "help": "attention implementation: sdpa, eager, flash_attention_2; empty = transformers' default"})

    def validate(self) -> None:
        if not self.model and not self.checkpoint:
            raise OneLayerError("eval needs --model, --checkpoint or both")
        if self.n < 1 or self.samples < 1:
            raise OneLayerError("--n and --samples must be >= 1")
        if self.samples > 1 and self.sampling.temperature <= 0:
            raise OneLayerError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
        self.sampling.validate()


def to_dict(config) -> dict:
    return asdict(config)


def from_dict(cls, data: dict):
    """Build a (nested) config dataclass from a dict, ignoring unknown keys."""
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            value = data[f.name]
            sub = f.default_factory if is_dataclass(f.default_factory) else None
            kwargs[f.name] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)
