"""The training input: the InternVL meta format, per-sample preparation, packing and the grain pipeline."""
