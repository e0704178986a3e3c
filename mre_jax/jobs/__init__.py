"""The CLI side of each job: config checks, files and messages, apart from the library functions
they call (in io/, infer/, eval/, train/, app/).

main.py's JOBS maps `config.job` to "module:function"; each function takes (config, workdir):

  convert.py   convert    a diffusers-format folder -> a project checkpoint (io/export.py)
  export.py    export     a project checkpoint -> a diffusers-format folder (io/export.py)
  edit.py      edit       edits one image, or every line of a requests file (infer/edit.py)
  evaluate.py  evaluate   Real-Edit: edit, judge, tabulate, compare (eval/evaluators.py)
  annotate.py  annotate   judge-made rewards for training triplets (eval/annotate.py)
  vae.py       train_vae  trains the synthetic world's VAE (train/vae_train.py)
  study.py     run_study  reward model vs no-reward baseline (eval/study.py)
  serve.py     serve      the web editing page (app/serve.py)

The train and precompute jobs live in mre_jax/train/ (loop.py: train_and_evaluate, precompute.py:
precompute_latents): those modules are the job.
"""
