"""The judge's offline backend (mre_jax/eval/synthetic_judge.py): exact scores against stored truths."""

import numpy as np
from PIL import Image

from mre_jax.data import synthetic
from mre_jax.eval import judge, synthetic_judge


def test_synthetic_backend_scores_exactly(tmp_path):
  ex = synthetic.make_example(4, "test", size=32)
  Image.fromarray(ex["truth"]).save(tmp_path / "t.png")
  synthetic_judge.write_truth_index(str(tmp_path / "index.json"),
                                    [(ex["original"], ex["instruction"], "t.png", ("not done", "half done"))])
  backend = synthetic_judge.SyntheticBackend(str(tmp_path / "index.json"))
  requests = [judge.Request(name, p, ex["instruction"], lambda e=edited: (ex["original"], e), describe=True)
              for name, edited in (("truth", ex["truth"]), ("none", ex["original"]), ("edited", ex["edited"]))
              for p in judge.PERSPECTIVES]
  requests.append(judge.Request("unknown", "following", "other", lambda: (ex["original"], ex["truth"])))
  with judge.JudgmentCache(str(tmp_path / "c.jsonl")) as cache:
    results = judge.judge_all(backend, requests, cache)
  got = {(r["item"], r["perspective"]): r for r in results}
  assert [got["truth", p]["score"] for p in judge.PERSPECTIVES] == [5.0, 5.0, 5.0]
  assert got["truth", "following"]["verdict"] == "yes" and got["truth", "following"]["failure"] == "None"
  assert got["none", "following"]["score"] == 0.0 and got["none", "following"]["verdict"] == "no"
  assert got["none", "following"]["failure"] == "not done"
  np.testing.assert_allclose([got["edited", p]["score"] for p in judge.PERSPECTIVES], ex["scores"], atol=1e-3)
  assert got["unknown", "following"]["status"] == "failed"
