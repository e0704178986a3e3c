"""reward_edit dataset (manual download)."""
