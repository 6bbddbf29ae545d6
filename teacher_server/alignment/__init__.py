"""Cross-tokenizer alignment (DESIGN.md section 6): pure code, bytes in, index maps out.

One job per module:

* byte_tables.py  the exact bytes of every token of a tokenizer.json (byte-level BPE,
                  SentencePiece/Metaspace with <0xNN> byte fallback and dummy prefix,
                  tiktoken-derived vocabularies, added and special tokens), cached by hash
* trie.py         a byte trie of a vocabulary, walked with numpy for many strings at once
* text.py         the teacher's side: bytes -> teacher ids (no dummy prefix, special-token
                  strings stay text, invalid UTF-8 byte by byte), its chat template
* specials.py     special tokens across tokenizers: pairs kept in the loss (EOS by default),
                  context-only twins, masked ones
* align.py        one rollout: the completion's byte stream, the teacher's tokens over it,
                  each student position's teacher row and partial bytes r
* pair.py         tables per (student, teacher) pair: the student trie, ambiguous teacher paths
* project.py      teacher candidates (paths) -> student tokens, with bounded expansion
* result.py       what every alignment returns (ScoreResult, Coverage) and how its steps are driven
* identity.py     a student with the teacher's own tokenizer: one pass, special targets masked
* cross.py        any other student tokenizer: align, the teacher pass, branch rounds, projection
"""
