"""The atomic file writer: whole files or the old file, never a part, and no temporary left behind."""

import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from mre_jax.io import files


def test_writes_text_bytes_and_streams(tmp_path):
  assert files.write_atomic(tmp_path / "a" / "b.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
  assert files.write_atomic(tmp_path / "c.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
  array = np.arange(12, dtype=np.float32).reshape(3, 4)
  files.write_atomic(tmp_path / "d.npy", lambda f: np.save(f, array))
  np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), array)
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.txt", "c.bin", "d.npy"]


def test_json_jsonl_and_image_helpers(tmp_path):
  files.write_json(tmp_path / "x.json", {"b": 1, "a": [2]}, sort_keys=True)
  assert (tmp_path / "x.json").read_text() == '{"a": [2], "b": 1}\n'
  files.write_jsonl(tmp_path / "x.jsonl", [{"i": 0}, {"i": 1}])
  assert [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()] == [{"i": 0}, {"i": 1}]
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  files.write_image(tmp_path / "x.png", pixels)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), pixels)


def _broken_writer(f):
  f.write(b"half of the new ")
  raise RuntimeError("serialiser failed")


def test_failed_serialiser_keeps_the_old_file(tmp_path):
  path = files.write_atomic(tmp_path / "out.json", '{"old": true}')
  with pytest.raises(RuntimeError, match="serialiser failed"):
    files.write_atomic(path, _broken_writer)
  assert path.read_text() == '{"old": true}'
  assert os.listdir(tmp_path) == ["out.json"]


def test_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
  path = files.write_atomic(tmp_path / "out.txt", "old")

  def refuse(src, dst):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(files.os, "replace", refuse)
  with pytest.raises(OSError, match="No space"):
    files.write_atomic(path, "new")
  assert path.read_text() == "old"
  assert os.listdir(tmp_path) == ["out.txt"]


def test_concurrent_writers_never_show_a_partial_file(tmp_path):
  path = tmp_path / "shared.bin"
  blobs = [bytes([i]) * 200_000 for i in range(4)]
  threads = [threading.Thread(target=lambda b=b: [files.write_atomic(path, b) for _ in range(5)]) for b in blobs]
  for t in threads:
    t.start()
  seen = set()
  while any(t.is_alive() for t in threads):
    if path.exists():
      seen.add(path.read_bytes())
  for t in threads:
    t.join()
  assert seen | {path.read_bytes()} <= set(blobs)
  assert os.listdir(tmp_path) == ["shared.bin"]
