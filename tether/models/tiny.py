"""The tiny default: a byte-level BPE tokenizer trained on the corpus and a small Llama-style model.

tether builds it itself so that the whole pipeline runs with no download, on a CPU, in minutes.
It is an ordinary transformers model: everything that works on it works on a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tether.config import check, check_fields
from tether.errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# Renders {"messages": [...]} in the HH-RLHF transcript style that tether's default template
# (tether.data) and the gold world use, so the two agree token for token.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '\n\nHuman: ' + m['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + m['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)


@dataclass
class TinyConfig:
    """Sizes of the tiny default model (about 1M parameters with these defaults)."""

    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size of the tiny tokenizer"})
    hidden_size: int = field(default=128, metadata={"help": "model width"})
    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width"})
    max_positions: int = field(default=256, metadata={"help": "longest sequence the model takes"})
    split_digits: bool = field(default=False, metadata={
        "help": "tokenize numbers digit by digit, as Llama 2's and Qwen's tokenizers do (else BPE merges a "
                "number into one token)"})

    def validate(self) -> None:
        check("vocab_size", self.vocab_size, ge=258, integer=True, note="the 256 bytes, EOS and PAD come first")
        check_fields(self, "hidden_size layers heads intermediate_size max_positions", ge=1, integer=True)
        if self.hidden_size % (2 * self.heads):
            raise ConfigError(f"--hidden-size ({self.hidden_size}) must be a multiple of 2 x --heads ({self.heads}): "
                              "each head's width must be even for the rotary embedding")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, split_digits: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (any text encodes: unknown bytes fall back to bytes).

    With ``split_digits`` every digit is its own pre-token, so no merge spans two digits.
    """
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny(tokenizer, cfg: TinyConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama-style causal LM sized by ``cfg`` for ``tokenizer``."""
    import torch

    cfg = cfg or TinyConfig()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
