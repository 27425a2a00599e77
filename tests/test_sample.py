"""`photon-peer sample`: text from a tiny checkpoint, greedy or sampled, from the swarm's weights when federated."""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import CLI, cli_env, tiny_overrides
from photon_p2p.checkpoint import load_checkpoint, save_checkpoint
from photon_p2p.config import ConfigError, ModelConfig, load_config
from photon_p2p.model import Transformer
from photon_p2p.sample import generate, sample_run
from photon_p2p.train.solo import load_model_from_run, run_solo
from deadlines import within


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, kjv_data):
    """A checkpoint after a few training steps."""
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    cfg = load_config(["tiny"], tiny_overrides(run_dir, **{"data.path": str(kjv_data), "train.max_steps": 5,
                                                          "train.eval_every": 0}))
    run_solo(cfg, progress=False)
    return run_dir


def test_generate_greedy_is_argmax_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, seq_len=8))
    ids = [1, 2, 3]
    greedy = generate(model, ids, 12)
    assert len(greedy) == 12
    context = ids + greedy[:4]
    logits = model(torch.tensor([context[-8:]]))[0][0, -1]
    assert greedy[4] == int(logits.argmax())  # and longer than seq_len: the context is cropped, no error
    a = generate(model, ids, 12, temperature=1.0, top_k=5, seed=7)
    assert a == generate(model, ids, 12, temperature=1.0, top_k=5, seed=7)
    assert a != generate(model, ids, 12, temperature=1.0, top_k=5, seed=8)
    assert all(t < 10 for t in generate(model, ids, 30, temperature=2.0, seed=1, vocab_limit=10))
    top1 = generate(model, ids, 6, temperature=1.0, top_k=1, seed=3)
    assert top1 == generate(model, ids, 6)  # top-1 sampling is greedy


def test_sample_cli_prints_prompt_and_continuation(tiny_run):
    def sample(*args: str) -> str:
        r = subprocess.run([*CLI, "sample", str(tiny_run), "--prompt", "In the beginning", "--max-new-tokens", "8",
                            *args], capture_output=True, text=True, timeout=within(120), env=cli_env())
        assert r.returncode == 0, r.stderr
        return r.stdout

    greedy = sample("--temperature", "0")
    assert greedy.startswith("In the beginning")
    assert greedy == sample("--temperature", "0", "--seed", "5")  # greedy ignores the seed
    assert sample("--temperature", "1", "--top-k", "20", "--seed", "1") == \
        sample("--temperature", "1", "--top-k", "20", "--seed", "1")


def test_sample_uses_the_global_model_of_a_federated_run(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run)
    state["global_model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    save_checkpoint(tmp_path, state)
    _, model, _ = load_model_from_run(tmp_path)
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())  # the swarm's weights, not the local ones
    # an all-zero model has uniform logits: greedy picks token 0 (end of text) at once and stops
    assert sample_run(tmp_path, "Hello", max_new_tokens=5, temperature=0) == "Hello"


def test_sample_argument_errors(tiny_run):
    for kwargs, needle in (({"temperature": -1}, "--temperature"), ({"top_k": -2}, "--top-k"),
                           ({"max_new_tokens": 0}, "--max-new-tokens")):
        with pytest.raises(ConfigError, match=needle):
            sample_run(tiny_run, "x", **kwargs)
