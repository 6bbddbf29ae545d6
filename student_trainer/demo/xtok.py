"""A second tokenizer for the demo task, for opd-study's cross-tokenizer variants.

The teacher keeps the demo tokenizer (task.build_tokenizer: one token per character,
`<pad>`/`<bos>`/`<eos>` at ids 0-2). This student tokenizer differs from it in the ways a
real pair of tokenizers does:

* the ten doubled digits "00" .. "99" are single tokens (a BPE merge each), so the
  student writes "773>" as "77", "3", ">" and the teacher as "7", "7", "3", ">": one
  student token can span two teacher tokens;
* the special tokens have other names and ids: `<s>`, `</s>` (end of sequence, paired
  with the teacher's `<eos>` by the service's default EOS pairing), `<|pad|>`, and a
  `<think>` control token that the teacher has no twin of. The student may emit it; the
  service drops it from the teacher's text and masks its position.

Doubles reverse to themselves, so the reversal stays learnable for the small student.
The decoder is Fuse: the text is the tokens back to back, which is also what the
teacher service reads as the student's bytes.
"""

from __future__ import annotations

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, processors

DIGITS = "0123456789"
SEPARATOR = ">"
DOUBLES = [digit * 2 for digit in DIGITS]
BOS, EOS, PAD, THINK = "<s>", "</s>", "<|pad|>", "<think>"
SPECIALS = [BOS, EOS, PAD, THINK]
# Fixed id order: digits 0-9, separator 10, doubles 11-20, specials 21-24.
VOCAB = [*DIGITS, SEPARATOR, *DOUBLES, *SPECIALS]


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The cross-tokenizer student's tokenizer; encoding adds <s> (never </s>)."""
    vocab = {token: index for index, token in enumerate(VOCAB)}
    # No pre-tokenizer: BPE runs over the whole text and merges every doubled digit it can,
    # left to right ("777" is "77", "7"); no merge involves ">", so a prompt and its answer
    # tokenize the same apart as together.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(digit, digit) for digit in DIGITS]))
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIALS])
    tok.decoder = decoders.Fuse()  # without it the tokens would be joined with spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[THINK],
        model_max_length=32,
        clean_up_tokenization_spaces=False,
    )
