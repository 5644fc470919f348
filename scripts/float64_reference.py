"""Whose rounding is the engine/trainer logprob difference? Both sides against float64.

Samples completions of arithmetic problems from a float32 vLLM engine serving a policy
(base + adapter, synced by lorasync's streaming sync), then scores the same tokens with the
trainer in float32 and in float64 (the exact reference, to ~1e-12), and prints how far each
float32 implementation is from it. Used for the health check's float32 tail in
docs/measurements.md ("The 36-step run"):

    .venv/bin/python scripts/float64_reference.py --model models/smollm2 \
        --adapter runs/smollm2_arith/checkpoints/step-000036/adapter --prompts 96
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    parser.add_argument("--prompts", type=int, default=96, help="problems, 8 completions each at T=1")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from lorasync.backend.open import open_engine
    from lorasync.sync.base import Strategy
    from lorasync.sync.policy import load_policy
    from lorasync.sync.weight_sync import WeightSync
    from lorasync.tasks import arith
    from lorasync.models.prompt import encode_prompt
    from lorasync.train.rollout import completion_logprobs

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    policy = load_policy(args.model, args.adapter, "float32").eval()
    engine = open_engine("colocated", Strategy.STREAMING, args.model, "float32")
    try:
        WeightSync(policy, engine, Strategy.STREAMING)()
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in arith.rows("train", args.prompts, seed=1)]
        samples = [c for group in engine.generate(prompts, 16, 1.0, n=8, seed=3) for c in group]
    finally:
        engine.close()
    prompt_of = [p for p in prompts for _ in range(8)]
    completions = [c.token_ids for c in samples]
    mask = torch.zeros(len(samples), max(map(len, completions)), dtype=torch.bool)
    served = torch.zeros(mask.shape)
    for i, c in enumerate(samples):
        mask[i, : len(c.token_ids)] = True
        served[i, : len(c.logprobs)] = torch.tensor(c.logprobs)

    def scored(dtype: torch.dtype) -> torch.Tensor:
        policy.to(dtype)
        out = torch.zeros(mask.shape, dtype=torch.float64)
        with torch.no_grad():
            for k in range(0, len(samples), 32):  # float64 logits of a whole batch do not fit
                lp, _ = completion_logprobs(policy, prompt_of[k : k + 32], completions[k : k + 32], tokenizer.pad_token_id)
                out[k : k + 32, : lp.shape[1]] = lp.double()
        return out

    trainer32, exact = scored(torch.float32), scored(torch.float64)
    report = {"tokens": int(mask.sum())}
    for name, values in (("vllm_float32", served.double()), ("trainer_float32", trainer32)):
        err = (values - exact).abs()[mask]
        report[name] = {
            "max_vs_float64": err.max().item(),
            "p999_vs_float64": err.quantile(0.999).item(),
            "tokens_above_1e-4": int((err > 1e-4).sum()),
        }
    report["vllm_vs_trainer_float32_max"] = (served.double() - trainer32).abs()[mask].max().item()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
