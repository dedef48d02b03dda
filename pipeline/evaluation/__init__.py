"""What users look at: held-out evaluation and inference."""
