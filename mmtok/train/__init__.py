"""Training loops for tokenizers and the generator."""
