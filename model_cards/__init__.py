"""Model-card templates rendered by ``save_pretrained`` and ``push_to_hub``."""
