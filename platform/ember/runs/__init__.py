"""What a run leaves for people and tools: the names of a run dir's files (`run_dir`), progress records
(`progress`, what `ember status` shows, written by dataset jobs and training runs alike), the plots and summary of a
run (`report`), and experiment tracking in MLflow and Weights & Biases (`tracking`). Training writes these; reading
them loads no torch."""
