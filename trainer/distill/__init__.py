"""Knowledge-distillation objectives: logit divergences (losses) and hidden-state matching (features)."""
