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

from pathlib import Path

import torch
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


# The demo vocabulary's token in the role of each student token both tokenizers have.
SAME_ROLE = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}


def same_weights_student(student_dir: Path, output: Path) -> Path:
    """The demo student (the teacher's tokenizer) with this tokenizer instead, and nothing else changed:
    the rows of tokens both vocabularies have are copied (special tokens by role); a doubled digit
    reads as its digit (input row) and, like <think>, which the demo vocabulary lacks, starts as
    unlikely as the padding token the student never writes (output row: <pad>'s). So "gain with
    this tokenizer / gain with the teacher's" compares one set of weights under two tokenizers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (output / "config.json").exists():
        return output
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    demo = AutoTokenizer.from_pretrained(student_dir).get_vocab()
    source_in, source_out = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    hidden = source_in.shape[1]
    rows_in, rows_out = torch.zeros(len(VOCAB), hidden), torch.zeros(len(VOCAB), hidden)
    for index, token in enumerate(VOCAB):
        same = SAME_ROLE.get(token, token)
        if same in demo:
            rows_in[index], rows_out[index] = source_in[demo[same]], source_out[demo[same]]
        else:
            rows_in[index] = source_in[demo[token[0]]] if token in DOUBLES else 0.0
            rows_out[index] = source_out[demo["<pad>"]]
    model.resize_token_embeddings(len(VOCAB), mean_resizing=False)
    model.get_input_embeddings().weight.data.copy_(rows_in)
    model.get_output_embeddings().weight.data.copy_(rows_out)
    tokenizer = build_tokenizer()
    model.config.update(
        {
            "vocab_size": len(VOCAB),
            **{
                f"{name}_token_id": tokenizer.convert_tokens_to_ids(t)
                for name, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))
            },
        }
    )
    model.generation_config.update(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    staging = output.with_name(output.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(output)
    return output
