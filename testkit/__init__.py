"""Real tokenizers, real and tiny models, stand-in teachers and exact references, shared by
tests/ and bench/ (not part of the installed packages)."""
