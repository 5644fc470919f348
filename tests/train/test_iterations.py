"""GRPO's μ (`optim.num_iterations`): μ optimizer steps over one generation batch, the ratio
taken against the logprobs of the policy that generated it, one sync after the last.

The claim is about the trainer, not vLLM: an in-memory engine samples random tokens and
records what the sync sends, so this runs in the fast tier.
"""

import torch

from lorasync.sync.base import Completion
from lorasync.train import trainer as trainer_module
from lorasync.train.grpo import grpo_loss
from tests.helpers import MemoryReceiver, demo_trainer


class RandomEngine(MemoryReceiver):
    """Samples uniformly random tokens, and counts its generate calls. The text shows about
    two digits in three tokens, so the demo's reward (the share of digits) varies."""

    def __init__(self, model_dir: str) -> None:
        super().__init__(model_dir)
        self.batches = 0

    def generate(self, prompts, max_tokens, temperature=1.0, n=1, seed=None):
        self.batches += 1
        gen = torch.Generator().manual_seed(seed or 0)
        return [
            [
                Completion(ids, "".join("7" if t % 3 else "x" for t in ids), [0.0] * len(ids))
                for ids in torch.randint(10, 100, (n, max_tokens), generator=gen).tolist()
            ]
            for _ in prompts
        ]


def trainer_with(model_dir, tmp_path, num_iterations, dropout=0.0):
    engine = RandomEngine(model_dir)
    trainer = demo_trainer(
        model_dir, tmp_path, engine, steps=2, optim={"num_iterations": num_iterations, "schedule": "linear"},
        lora={"dropout": dropout},
    )
    steps = []
    # each optimizer step, with the learning rate the schedule gave it
    trainer.optimizer.register_step_pre_hook(
        lambda *_: steps.append(trainer.scheduler.get_last_lr()[0])
    )
    return trainer, engine, steps


def test_one_iteration_is_one_optimizer_step_at_ratio_one(tiny_model, tmp_path):
    trainer, engine, steps = trainer_with(tiny_model("qwen2"), tmp_path, 1)
    rows = [trainer.train_step() for _ in range(2)]
    assert len(steps) == 2 and engine.batches == 2 and engine.loads == 2
    assert [r["optimizer_steps"] for r in rows] == [1, 1]
    # the only policy update happens after the loss: the ratio is exactly 1, nothing clips
    assert all(r["clip_fraction"] == 0 for r in rows)
    assert steps[1] < steps[0]  # the linear schedule counts optimizer steps: 2 of 2


def test_two_iterations_take_two_optimizer_steps_per_batch_and_sync_once(tiny_model, tmp_path, monkeypatch):
    trainer, engine, steps = trainer_with(tiny_model("qwen2"), tmp_path, 2)
    losses = []

    def recorded(logprobs, old, *args, **kwargs):
        losses.append((logprobs.detach().clone(), old.clone()))
        return grpo_loss(logprobs, old, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "grpo_loss", recorded)
    rows = [trainer.train_step() for _ in range(2)]
    assert len(steps) == 4 and engine.batches == 2 and engine.loads == 2
    assert [r["optimizer_steps"] for r in rows] == [2, 2]
    assert [r["weight_version"] for r in rows] == [1, 2]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == 4  # 4 scheduled steps
    # per batch: iteration 1 at ratio 1; iteration 2 moved by the first update, its ratio
    # still taken against the same logprobs, those of the policy that generated the batch
    for first, second in (losses[0:2], losses[2:4]):
        torch.testing.assert_close(first[0], first[1])
        assert torch.equal(first[1], second[1])
        assert (second[0] - second[1]).abs().max() > 1e-4


def test_one_iteration_takes_the_old_logprobs_from_the_update_itself(tiny_model, tmp_path, monkeypatch):
    """μ = 1 and no dropout: no forward pass of its own for the old logprobs; the update's
    forward pass (eval mode) gives them, equal to what a separate pass would give."""
    trainer, engine, _ = trainer_with(tiny_model("qwen2"), tmp_path, 1)
    calls, batches = [], []
    real_score = trainer_module.score

    def recorded_score(*args, **kwargs):
        batch = real_score(*args, **kwargs)
        calls.append(kwargs.get("score_old", True))
        batches.append(batch)
        return batch

    monkeypatch.setattr(trainer_module, "score", recorded_score)
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    row = trainer.train_step()
    assert calls == [False]
    batch = batches[0]
    # the policy that generated the batch, scored one completion at a time by a plain forward
    # pass (not the trainer's batched, padded `completion_logprobs`); the health check
    # recomputed from that and the engine's own logprobs (not by `batch.health()`)
    trainer.model.load_state_dict(policy_before, strict=False)
    trainer.model.eval()
    diffs = []
    with torch.no_grad():
        for i, (prompt, sample) in enumerate(zip(batch.prompts, batch.samples)):
            logits = trainer.model(input_ids=torch.tensor([prompt + sample.token_ids])).logits[0].float()
            at = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(sample.token_ids))
            separate = torch.log_softmax(logits, dim=-1)[at, sample.token_ids]
            torch.testing.assert_close(batch.old_logprobs[i, : len(at)], separate, atol=1e-5, rtol=0)
            diffs.append(float((separate - torch.tensor(sample.logprobs)).abs().max()))
    assert abs(row["logprob_diff_max"] - max(diffs)) <= 1e-5, (row["logprob_diff_max"], max(diffs))


def test_lora_dropout_scores_the_old_logprobs_in_a_pass_of_their_own(tiny_model, tmp_path, monkeypatch):
    """With LoRA dropout the update's forward pass (train mode: dropout on) is not the policy
    the engine served: the old logprobs get a pass of their own, in eval mode, and equal it."""
    trainer, _, _ = trainer_with(tiny_model("qwen2"), tmp_path, 1, dropout=0.1)
    dropouts = [m for m in trainer.model.modules() if type(m).__name__ == "Dropout"]
    assert dropouts and all(m.p == 0.1 for m in dropouts)  # built in, not set afterwards
    with torch.no_grad():  # a fresh adapter (lora_B = 0) would hide the dropout on its input
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    calls, batches = [], []
    real_score = trainer_module.score

    def recorded_score(*args, **kwargs):
        calls.append(kwargs.get("score_old", True))
        batches.append(real_score(*args, **kwargs))
        return batches[-1]

    monkeypatch.setattr(trainer_module, "score", recorded_score)
    trainer.train_step()
    assert calls == [True]
    batch = batches[0]
    trainer.model.load_state_dict(policy_before, strict=False)
    trainer.model.eval()
    with torch.no_grad():
        served, mask = trainer_module.completion_logprobs(
            trainer.model, batch.prompts, batch.completions, trainer.tokenizer.pad_token_id
        )
    torch.testing.assert_close(batch.old_logprobs[mask], served[mask], atol=1e-5, rtol=0)
