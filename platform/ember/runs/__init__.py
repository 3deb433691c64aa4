"""What a run leaves for people and tools: progress records, reports, experiment tracking.

`progress` is the record a job writes as it goes (what `ember status` shows), `report` the Markdown summary of a run
or evaluation, `tracking` MLflow and Weights & Biases. These read run dirs; they import no torch and train nothing."""
