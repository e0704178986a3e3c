"""Evaluation: the vision-language judge (judge.py) and its offline backend for the synthetic world
(synthetic_judge.py), the Real-Edit runner (evaluators.py), the reward annotator (annotate.py), the
exact judge's evaluation of runs (synthetic_eval.py) and the paper's ablation study (study.py,
study_figures.py). The jobs that drive them are in mre_jax/jobs/."""
