"""The evaluation plane: held-out losses, generation scores (token F1) and the lm-eval harness on Ray actors.

`evaluate` runs a `kind: evaluate` spec (its result reused while its inputs are unchanged); `harness` is the
lm-evaluation-harness model class that spreads a task's requests over Ray actors. Nothing here trains."""
