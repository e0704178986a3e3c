"""Input data: the grain pipeline over TFDS sources (input_pipeline.py), source records shared by
the builders (records.py), the one image-to-RGB conversion (images.py), the one CLIP tokenization
(tokens.py), the latent cache (latent_cache.py) and the synthetic editing world with its exact
ground truth (synthetic.py)."""
