"""The command line as a user meets it: doctor, teachers compare, logits inspect/verify, bad sources."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distillery.models.load import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[2]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "distillery.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_doctor_reports_torch_cache_and_teacher(tmp_path):
    out = cli("doctor", "--cache", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for word in ("torch", "cache", str(tmp_path), "builtin:smollm2-135m-instruct", "corpus"):
        assert word in out.stdout
    assert "not yet converted" in out.stdout  # an empty cache: the GGUF is installed but not converted


def test_hub_id_offline_fails_cleanly(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
            load_model("no-such-org/no-such-model")
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model("./not/a/folder")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))


def test_teachers_compare_table(tiny_teacher_dir, trained_tiny_teacher, tiny_tokenizer, tmp_path):
    other = tmp_path / "other"
    trained_tiny_teacher.save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    recipe = {"name": "cmp", "run_dir": str(tmp_path / "runs"), "teacher": {"model": str(tiny_teacher_dir)},
              "student": {"from_teacher": {"keep_layers": [0]}},
              "data": {"source": {"kind": "corpus", "name": "gensim-lee"}},
              "generate": {"prompts": {"kind": "tasks", "limit": 4}, "chat_template": False,
                           "decoding": [{"name": "g", "max_new_tokens": 4}],
                           "teachers": [{"model": str(tiny_teacher_dir)}, {"model": str(other)}]}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = cli("teachers", "compare", str(path), "--prompts", "4", "--json", str(tmp_path / "cmp.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "agreement_with_reference" in out.stdout and "tokens_per_s" in out.stdout
    import json

    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["teacher"] for r in rows] == [str(tiny_teacher_dir), str(other)]
    assert rows[0]["agreement_with_reference"] == 1.0  # the reference agrees with itself
    assert rows[1]["agreement_with_reference"] == 1.0  # the same weights, greedy: the same answers


def test_logits_inspect_and_verify(trained_tiny_teacher, tmp_path):
    import torch

    from distillery.signals.capture import capture
    from distillery.signals.online import OnlineTeacher

    blocks = torch.randint(0, 512, (6, 16))
    capture(OnlineTeacher(trained_tiny_teacher, model_id="tiny", tokenizer_fingerprint="fp"), blocks,
            tmp_path / "logits", k=8, progress=False)
    out = cli("logits", "inspect", str(tmp_path / "logits"))
    assert out.returncode == 0 and "bytes" in out.stdout and "tiny" in out.stdout, out.stderr
    assert cli("logits", "verify", str(tmp_path / "logits")).returncode == 0
    shard = sorted((tmp_path / "logits").glob("shard-*"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    bad = cli("logits", "verify", str(tmp_path / "logits"))
    assert bad.returncode != 0 and shard.name in bad.stderr
