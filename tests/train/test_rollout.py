"""`completion_logprobs`: each completion token's logprob given its prompt and the tokens
before it, batched with padding and computing logits only where completions are predicted."""

import torch
from transformers import AutoModelForCausalLM

from lorasync.train.rollout import completion_logprobs


def reference(model, prompt, completion):
    """One sequence alone, unpadded, every position's logits."""
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return [logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(completion)]


def test_batched_logprobs_equal_each_sequence_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2")).eval()
    # prompts of different lengths, completions of different lengths (one empty)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 17, 18], [15, 16]]
    completions = [[20, 21, 22, 23], [24], [25, 26], []]
    with torch.no_grad():
        out, mask = completion_logprobs(model, prompts, completions, pad_id=0)
        assert out.shape == mask.shape == (4, 4)
        assert mask.sum(1).tolist() == [4, 1, 2, 0]
        for i, (p, c) in enumerate(zip(prompts, completions)):
            torch.testing.assert_close(out[i, : len(c)], torch.tensor(reference(model, p, c)), atol=1e-5, rtol=0)
        assert out[~mask].abs().sum() == 0
