"""Checkpoints: only trained tensors, written so that a kill at any point loses nothing already saved."""

import json
from pathlib import Path

import pytest
import torch

from onelayer.checkpoint import find_checkpoint, read_meta
from onelayer.training import train

from .test_train import config, rewards
from .tiny import tiny_model


def test_a_run_killed_between_the_two_renames_resumes_from_checkpoint_old(tmp_path, tokenizer, monkeypatch):
    whole_model = tiny_model("llama")
    whole = train(config(tmp_path / "whole", steps=4, save_every=2), whole_model, tokenizer, progress=False)

    real_rename = Path.rename

    def rename(self, target):
        # the step-4 save has moved the step-2 checkpoint aside and dies before the new one takes its place
        if self.name == "checkpoint.tmp" and (self.parent / "checkpoint.old").exists():
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    run = tmp_path / "killed" / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "killed", steps=4, save_every=2), tiny_model("llama"), tokenizer, progress=False)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").is_dir()
    assert find_checkpoint(run) == run / "checkpoint.old" and read_meta(run)["step"] == 2

    resumed_model = tiny_model("llama")
    train(config(tmp_path / "killed", steps=4, save_every=2), resumed_model, tokenizer, progress=False)
    assert rewards(run) == rewards(whole.out)
    for p, q in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert read_meta(run)["step"] == 4 and find_checkpoint(run) == run / "checkpoint"
    assert not (run / "checkpoint.old").exists() and not (run / "checkpoint.tmp").exists()
    assert json.loads((run / "checkpoint" / "onelayer.json").read_text())["step"] == 4
