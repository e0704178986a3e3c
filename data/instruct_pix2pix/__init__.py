"""instruct_pix2pix dataset (manual download)."""
