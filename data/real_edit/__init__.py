"""real_edit dataset (manual download)."""
