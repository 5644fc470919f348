"""Tiny random causal LMs and a tokenizer, built locally (no model hub).

Tests, the CLI and benchmarks use these: a model directory in Hugging Face layout
(config.json, model.safetensors, tokenizer files) that both transformers and vLLM load.
Shapes are chosen for vLLM's CPU backend, whose attention needs head_dim >= 32.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHITECTURES = ("qwen2", "llama", "qwen3", "gpt2", "gemma3", "phi3")
# The tiny gemma3's attention: the first layers slide over this many tokens, the last attends
# to all. Shorter than verification's probes (32 tokens), so a wrong window shows.
GEMMA3_SLIDING_WINDOW = 8
TOKENIZER_VOCAB = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
# The synthetic corpus's words (`synthetic_corpus`); the tiny demo draws its prompts from them.
WORDS = (
    "the a one two three four five six seven eight nine zero cat dog sun moon red blue "
    "green fast slow up down left right yes no and or not is was will be have has do "
    "train sync model weight adapter engine token reward step policy value learn"
).split()


@dataclass(frozen=True)
class TinyShape:
    """Dimensions of a tiny model. head_dim = hidden_size / num_heads must be >= 32 on CPU."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim < 32:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {head_dim}, but vLLM's CPU attention "
                "needs head_dim >= 32: raise hidden_size or lower num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )


# Real shapes, for benchmarks: the weights are random, only the sizes are real.
SHAPES = {
    "tiny": TinyShape(),
    "0.5b": TinyShape(  # Qwen2-0.5B: 494 M parameters with tied embeddings
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
    ),
}


def synthetic_corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences and digit runs to train the tokenizer on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))
        lines.append(" ".join(words) + f" {digits}.")
    return lines


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the synthetic corpus (deterministic for a seed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
    )


def tiny_config(arch: str, shape: TinyShape, tie_word_embeddings: bool) -> PretrainedConfig:
    """A transformers config of the given architecture with a tiny shape."""
    shared = dict(
        vocab_size=shape.vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if arch == "gpt2":  # Conv1D layers: LoRA with fan_in_fan_out; GPT-2's own field names
        return GPT2Config(
            n_embd=shape.hidden_size,
            n_layer=shape.num_layers,
            n_head=shape.num_heads,
            n_inner=shape.intermediate_size,
            n_positions=shape.max_position_embeddings,
            **shared,
        )
    common = dict(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        **shared,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "llama":
        return LlamaConfig(**common)
    head_dim = shape.hidden_size // shape.num_heads
    if arch == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    if arch == "gemma3":  # text-only Gemma 3 (model_type gemma3_text, Gemma3ForCausalLM)
        # Sliding-window layers and one full-attention layer last; q/k norms; the embedding
        # is scaled by sqrt(hidden_size) in the forward pass, not in the checkpoint.
        return Gemma3TextConfig(
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention"] * (shape.num_layers - 1) + ["full_attention"],
            **common,
        )
    if arch == "phi3":  # q/k/v and gate/up fused in the checkpoint itself (qkv_proj, gate_up_proj)
        return Phi3Config(**common)
    raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    shape: TinyShape = TinyShape(),
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init_std: float = 0.08,
) -> Path:
    """Build a random model plus tokenizer and save both (safetensors) into `out_dir`.

    Matrices are drawn with std `init_std`. The default, wider than transformers' 0.02, makes
    a tiny model's logprobs react clearly to weight changes, so a wrong sync shows in
    verification; deep real-shape models (benchmarks) use 0.02, or activations blow up.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The synthetic corpus supports about 512 tokens; a larger model vocabulary (a real
    # model's shape) simply leaves the rows above the tokenizer's ids unused.
    tokenizer = build_tokenizer(min(shape.vocab_size, TOKENIZER_VOCAB), seed=seed)
    if len(tokenizer) > shape.vocab_size:
        raise ValueError(
            f"TinyShape.vocab_size ({shape.vocab_size}) is below the tokenizer's "
            f"{len(tokenizer)} tokens: raise it"
        )
    config = tiny_config(arch, shape, tie_word_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std)
            elif name.endswith("bias") or (arch == "gemma3" and name.endswith("norm.weight")):
                # Gemma's norms scale by (1 + weight), with weight 0 at init: random weights
                # make a norm that is lost or applied without the offset show in the logprobs.
                param.normal_(0.0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
