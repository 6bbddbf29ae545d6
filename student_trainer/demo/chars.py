"""Character-level tokenizers of the demo's tasks: one token per character, looked up in a fixed
vocabulary whose special tokens are registered as such."""

from __future__ import annotations

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors


def character_tokenizer(
    vocab: list[str], specials: tuple[str, ...], *, add_bos: bool, chat_template: str | None = None
) -> transformers.PreTrainedTokenizerFast:
    """`specials` start with <pad>, <bos>, <eos>; `add_bos`: encoding a text prepends <bos>."""
    pad, bos, eos = specials[:3]
    ids = {token: index for index, token in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token=None))
    # Registered as special so tokenizer.json marks them (the teacher service masks
    # special tokens) and so "<eos>" in text is one token, not five characters.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # Every character is its own token; WordLevel then looks it up in the vocabulary.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins the tokens without the spaces WordLevel would put between them.
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ids[bos])]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=32,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
