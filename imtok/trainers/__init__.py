"""Training loops of the pipeline's stages (tokenizer, prior): library code the stages call."""
