"""Training the model's own weights together: gradient averagers for hivemind (``acp``)."""
