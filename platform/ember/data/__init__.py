"""The data plane: corpus sources and built-in corpora (`sources`, `builtin`), tokenizers (`tokenizer`), the corpus
steps as plain callables (`steps`), chat templates and conversation encoding (`chat`), the one executor that runs a
whole dataset job on Ray Data (`units`) with its two jobs, corpus tokenization (`pipeline`) and fine-tuning
conversations (`sft`), and the shard format with its reader (`shards`)."""
