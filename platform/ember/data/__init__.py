"""The data plane: corpus sources, built-in corpora, tokenizers, the Ray Data tokenize pipeline, and shards."""
