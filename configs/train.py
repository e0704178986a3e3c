"""Training config. Variants: default (the embedded demo), `long` (its longer run), `tiny` (tests) and
`sd15` (the paper).

python main.py --config=configs/train.py --workdir=W
python main.py --config=configs/train.py:sd15 --config.model.pretrained=IP2P_DIR \
    --config.data.manual_dir=REWARD_EDIT_DIR --workdir=W
"""

import ml_collections


def get_config(arg: str | None = None):
  config = ml_collections.ConfigDict()
  config.job = "train"
  config.seed = 0  # parameters, data order, noise: a run is a function of the seed
  config.stage = 2  # 1: InstructPix2Pix (no rewards); 2: MRE (reward conditioning)
  config.num_steps = 6000  # optimiser steps (the default run: 10-25 minutes on 2 cores; README, "Does it work?")
  config.batch_size = 8  # global examples per optimiser step (all processes, all microbatches)
  config.grad_accum_steps = 1  # microbatches per optimiser step
  config.cond_dropout = 0.05  # p: instruction dropped when r < 2p, image when p <= r < 3p
  config.noise_offset = 0.0  # per-(example, channel) noise added to the training noise (diffusers' noise_offset)
  config.noise_pyramid = 0.0  # d > 0: multi-resolution training noise, level i weighted d^i (diffusion.training_noise)
  # gamma > 0: Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' --snr_gamma, which suggests 5.0); 0: plain MSE.
  # On the demo (v-prediction) 5.0 lowered following from 0.97 to 0.66 (docs/experiments.md, "What holds quality back")
  config.snr_gamma = 0.0
  config.log_every = 50  # steps between TensorBoard scalars / progress updates (step metrics: means over those steps)

  config.model = ml_collections.ConfigDict()
  config.model.init = "tiny"  # tiny: random tiny model; pretrained: from model.pretrained
  config.model.pretrained = ""  # diffusers folder (SD 1.5, InstructPix2Pix, stage 1) or project checkpoint
  config.model.reward = True  # stage 2 only: False is the no-reward ablation on reward data
  config.model.dtype = "float32"  # compute dtype (params stay float32): float32 | bfloat16
  config.model.remat = False  # gradient checkpointing of the U-Net blocks
  config.model.reward_dropout = 0.1  # dropout inside the MRC block (training only)
  # Kernel families (mre_jax/ops), recorded in the workdir's mre_model.json; "auto" picks per layer.
  config.model.attention = "auto"  # auto | xla | cudnn (GPU) | splash (TPU) | cpu (C++, XLA:CPU)
  config.model.conv = "auto"  # auto | xla | winograd
  config.model.norm = "auto"  # GroupNorm: auto | xla | cpu
  # init=tiny: a shipped VAE (tiny.VAES), a diffusers folder, or "" (random). synthetic_64px_sharp is
  # synthetic_64px with an adversarially fine-tuned decoder: the same encoder and latents, sharper edits;
  # synthetic_64px_cond is that decoder fine-tuned to also see the input image (configs/vae.py:image_decoder;
  # the same latents again; not exportable to diffusers: use synthetic_64px_sharp to export).
  config.model.vae = "synthetic_64px_cond"
  # init=tiny: a shipped text encoder (tiny.TEXT_ENCODERS; written by the text job, configs/text.py:
  # CLIP-style pretraining on the synthetic world), a folder the text job wrote, or "" (random).
  # docs/experiments.md, "The random text encoder is what holds local edits back".
  config.model.text_encoder = "synthetic_64px"
  # init=tiny: keys of the scheduler config written to frozen/scheduler/ (training and sampling read it)
  # over SD 1.5's. v_prediction: at high noise an epsilon target weighs the image by alpha_bar / (1 -
  # alpha_bar) (0.005 at the last step), too little for a small U-Net to learn to draw it from the input
  # image; edits then take their colours from the start noise. A velocity target weighs it >= 1.
  # (rescale_betas_zero_snr=True with timestep_spacing="trailing", Lin et al. 2023, was measured
  # too and did not help here. Both were measured before model.unet.norm_num_groups was 8, the
  # larger cause of those colour casts: docs/experiments.md.)
  config.model.scheduler = ml_collections.ConfigDict(dict(prediction_type="v_prediction"))
  config.model.unet = ml_collections.ConfigDict()  # init=tiny: fields of models.UNetConfig over tiny.UNET
  config.model.unet.in_channels = 16  # noisy latents + image latents (the shipped VAE has 8 channels)
  config.model.unet.out_channels = 8
  config.model.unet.block_out_channels = (32, 64, 128)
  config.model.unet.attention_head_dim = (1, 2, 4)  # heads per level (diffusers' name)
  config.model.unet.norm_num_groups = 8  # 4+ channels per GroupNorm group (SD's 32 groups would be instance norms)
  config.model.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  config.model.unet.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_edit"  # a builder in data/: synthetic_edit, instruct_pix2pix, reward_edit
  config.data.builder_config = "64px"  # builder config name ("" = the builder's default)
  config.data.data_dir = ""  # where TFDS data is built/read ("" = <workdir>/tfds)
  config.data.manual_dir = ""  # local source files for instruct_pix2pix / reward_edit
  config.data.split = "train"
  config.data.crop_size = 64  # training resolution in pixels (256 for SD)
  config.data.resize = "short_side"  # short_side + random crop, or square (the release)
  # Random horizontal flip (the same for both images; SD: True). Off for the synthetic world: its
  # instructions name sides ("add a red circle at the top left"), and a cached latent flipped is not
  # the latent of the flipped image (this VAE decodes it at 26 dB PSNR instead of 30).
  config.data.flip = False
  config.data.latent_cache = "auto"  # encoder outputs to train from: a cache folder (job precompute),
  # "auto" (<workdir>/latents, written on first use) or "" (encode every batch)
  config.data.worker_count = 0  # grain worker processes (0: threads in this process)
  config.data.prefetch = 8  # batches prefetched

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-3  # the tiny demo learns faster than the paper's 5e-5
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 1e-2
  config.optim.clip_norm = 1.0  # global-norm gradient clipping
  config.optim.warmup_steps = 100  # linear warm-up steps (from 0 to lr)
  # After the warm-up: constant (the release) or cosine (decays to 0 at the last step; the demo's
  # EMA then averages a settling model: docs/experiments.md)
  config.optim.schedule = "cosine"

  config.ema = ml_collections.ConfigDict()  # diffusers EMAModel defaults
  config.ema.decay = 0.9999  # cap of the (1 + s) / (10 + s) rule
  config.ema.min_decay = 0.0
  config.ema.update_after_step = 0
  config.ema.use_warmup = False
  config.ema.inv_gamma = 1.0
  config.ema.power = 2 / 3

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel axis size (-1: devices left over)
  config.mesh.fsdp = 1  # axis that also splits params / EMA / optimiser state
  config.mesh.fsdp_min_size = 2**14  # arrays smaller than this stay replicated

  config.sample = ml_collections.ConfigDict()  # PNG grids: input | truth | target | edit@5,5,5 | edit@own
  config.sample.every = 500  # steps between grids (0: never); also at the end
  config.sample.count = 4  # examples in a grid (the split's first ones)
  config.sample.split = "test"  # where they come from (the training split if the data has no such split)
  config.sample.steps = 20  # Euler ancestral steps
  config.sample.tile = 256  # minimum tile side in pixels (images are upscaled by nearest neighbour)
  config.sample.text_guidance = 3.0  # as config.eval's
  config.sample.image_guidance = 1.5

  config.eval = ml_collections.ConfigDict()  # at the end: exact judge on held-out synthetic edits
  config.eval.count = 140  # test examples (categories cycle: 20 each); 0: no evaluation
  config.eval.split = "test"
  config.eval.steps = 20  # Euler ancestral steps
  # The release edits at 7.5 (configs/edit.py). The demo model, with its shipped text encoder, edits
  # better at 3.0 (README, "Does it work?": 1.01 / 3.72 / 2.24 against 0.68 / 3.04 / 2.01 at 7.5).
  config.eval.text_guidance = 3.0
  config.eval.image_guidance = 1.5
  config.eval.seed = 0  # example i draws its noise from (seed, i)
  config.eval.batch_size = 35  # edits per sampler call

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every = 500  # steps between saves (also saved at the end and on SIGTERM)
  config.checkpoint.keep = 3  # checkpoints kept
  config.checkpoint.async_save = True

  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False  # call jax.distributed.initialize (multi-host)
  config.distributed.coordinator_address = ""  # host:port ("" = from the environment)
  config.distributed.num_processes = 0  # 0 = from the environment
  config.distributed.process_id = -1  # -1 = from the environment

  if arg == "tiny":  # the tests' runs: 32 px, a random tiny model (8x VAE), no cache, no evaluation
    config.model.vae = ""
    config.model.text_encoder = ""
    config.model.scheduler = ml_collections.ConfigDict()  # SD 1.5's
    config.num_steps = 300
    config.log_every = 10
    config.optim.lr = 3e-4
    config.optim.warmup_steps = 0
    config.optim.schedule = "constant"
    config.sample.every = 100
    config.checkpoint.every = 100
    config.model.unet = ml_collections.ConfigDict()
    config.data.builder_config = "32px"
    config.data.crop_size = 32
    config.data.latent_cache = ""
    config.sample.tile = 32
    config.eval.count = 0
  elif arg == "long":  # the documented longer run (README, "Does it work?"): 5x the data, batch 32,
    # 12000 steps: 8x the default's images (384k), 73 minutes on 2 cores. Its U-Net learns local edits,
    # which batch 8 for 20000 steps (160k images) did not (docs/experiments.md, "Batch 32 and 8x").
    config.num_steps = 12_000
    config.batch_size = 32
    config.data.builder_config = "64px_10k"
    config.sample.every = 3000
    config.checkpoint.every = 3000
    config.checkpoint.keep = 5
  elif arg == "sd15":  # SPEC section 3: stage 2 from an InstructPix2Pix / stage-1 folder
    config.num_steps = 10_000
    config.batch_size = 16  # per GPU 4 x 4 accumulation in the release; scale with devices
    config.grad_accum_steps = 4
    config.log_every = 50
    config.model.init = "pretrained"
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.data.name = "reward_edit"
    config.data.builder_config = ""
    config.data.crop_size = 256
    config.data.latent_cache = ""
    config.data.flip = True
    config.data.worker_count = 8
    config.optim.lr = 5e-5
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0
    config.checkpoint.every = 1000
    config.sample.every = 1000
    config.sample.steps = 30
    config.sample.text_guidance = 7.5  # the release's (configs/edit.py)
    config.eval.count = 0  # the exact judge needs the synthetic world; evaluate with configs/evaluate.py
  elif arg not in (None, ""):
    raise ValueError(f"configs/train.py: unknown variant {arg!r} (expected long, tiny or sd15)")
  return config
