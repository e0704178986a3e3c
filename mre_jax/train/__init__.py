"""Training: the state and pure step (trainer.py), what runs before the loop (setup.py), the loop
and the train job (loop.py), sample grids (samples.py), the precompute job (precompute.py),
sharding rules (sharding.py) and the VAE training of the synthetic world (vae_train.py; its job is
jobs/vae.py)."""
