"""The models the training stages train (tokenizer, prior, domain classifier), each a task of the
one training loop in ``imtok.engine``: library code the stages call."""
