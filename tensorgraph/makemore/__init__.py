"""The lecture's character-level MLP ("makemore"): data, model, training and sampling."""
