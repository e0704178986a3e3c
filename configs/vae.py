"""VAE config: trains the frozen autoencoder of the embedded demo on the synthetic world.

python main.py --config=configs/vae.py --workdir=W

Writes W/vae (diffusers AutoencoderKL format) and W/vae_eval.json (test PSNR) at every
evaluation. The weights the repo ships in mre_jax/assets/vae_synthetic_64px/ are this command's
W/vae after its step-4000 evaluation, with these defaults (that run stopped at step 4500; 30.06 dB
clean PSNR then, about an hour on 2 CPU cores).
"""

import ml_collections


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.job = "vae"
  config.seed = 0  # initialisation, crops and batches
  config.num_steps = 8000  # optimiser steps
  config.batch_size = 32  # crops per step
  config.image_size = 64  # side of the builder's images
  config.crop_size = 32  # training crop side (evaluation uses whole images)
  config.lr = 1e-3  # Adam peak learning rate, cosine decay to 5% of it
  config.kl_weight = 1e-6  # weight of the KL term (SD's VAE: 1e-6)
  config.log_every = 100  # steps between metrics.jsonl lines
  config.eval_every = 1000  # steps between test evaluations (each writes W/vae and W/vae_eval.json)
  config.init = ""  # start from a trained VAE (a shipped name, tiny.VAES, or a diffusers folder); "": random
  config.train_encoder = True  # False (needs init): train the decoder only, the latents stay as they were
  # > 0: the scale-equivariance term (vae_train.scale_error; Skorokhodov et al. 2025): latents with an
  # image's spectrum, easier for the U-Net to sample; needs train_encoder
  config.scale_weight = 0.0
  config.edge_weight = 0.0  # weight of the L1 error of 1-pixel differences (sharper edges)
  # > 0: noise of std U(0, latent_noise) x the latents' std added to the decoder's latents in training
  # (vae_train.perturb_latents): a decoder for a diffusion model's slightly-off latents
  config.latent_noise = 0.0
  # > 0: a PatchGAN discriminator and SD's adversarial term, adaptively weighted (SD: 0.5); 0: none
  config.adv_weight = 0.0

  config.vae = ml_collections.ConfigDict()  # AutoencoderKL architecture (diffusers config keys)
  config.vae.block_out_channels = (32, 48, 64)  # one down block per width: 3 -> a 4x VAE
  config.vae.layers_per_block = 1
  config.vae.norm_num_groups = 16
  config.vae.latent_channels = 8  # SD's has 4; 8 reconstruct this world better at 4x (U-Net: 16 in, 8 out)
  # > 0: the decoder also sees the input image, through conditioning layers of this width (models/vae.py;
  # not a diffusers AutoencoderKL any more); with init, they start at zero (the init's decoder)
  config.vae.image_condition_width = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_edit"  # a builder in data/ with original/truth/edited images
  config.data.builder_config = "64px"
  config.data.data_dir = ""  # where TFDS data is built/read ("" = <workdir>/tfds)
  config.data.num_train = 0  # training examples to read (0: all)
  config.data.num_test = 0  # test examples to evaluate (0: all)

  if arg == "quick":  # a smoke run for tests
    config.num_steps = 4
    config.batch_size = 4
    config.log_every = 2
    config.vae.block_out_channels = (8, 8, 8)
    config.vae.norm_num_groups = 4
    config.data.builder_config = "tiny"
    config.image_size = 32
    config.crop_size = 16
  elif arg == "sharpen":  # stage 2: decoder-only fine-tune of stage 1's VAE with the edge term
    config.init = ""  # set to stage 1's workdir (--config.init=W1)
    config.train_encoder = False
    config.edge_weight = 1.0
    config.num_steps = 1500
    config.lr = 3e-4
    config.eval_every = 500
  elif arg == "adversarial":  # decoder-only adversarial fine-tune of the shipped VAE: same latents, sharper edges
    config.init = "synthetic_64px"
    config.train_encoder = False
    config.adv_weight = 0.5
    config.num_steps = 1500
    config.lr = 1e-4
    config.eval_every = 500
  elif arg == "image_decoder":  # the adversarial decoder, fine-tuned to see the input image: same latents
    config.init = "synthetic_64px_sharp"
    config.train_encoder = False
    config.vae.image_condition_width = 64  # 32: edits 3.32 against 3.53 (docs/experiments.md)
    config.latent_noise = 0.3  # 0.6 decoded the U-Net's edits no better and the truth worse
    config.adv_weight = 0.5
    config.num_steps = 2000
    config.lr = 2e-4
    config.eval_every = 500
    config.data.builder_config = "64px_10k"
  elif arg not in (None, ""):
    raise ValueError(f"configs/vae.py: unknown variant {arg!r} (expected quick, sharpen, adversarial or "
                     "image_decoder)")
  return config
