"""Model: parameter counts match the formula, causality holds, export loads as a Hugging Face Llama."""

import json

import pytest
import torch

from photon_p2p.config import ModelConfig, load_config
from photon_p2p.export import export_hf
from photon_p2p.model import Transformer, count_params


@pytest.mark.parametrize("tie,kv", [(True, None), (False, 2)])
def test_param_count_matches_formula(tie, kv):
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=kv, seq_len=16, tie_embeddings=tie)
    assert Transformer(cfg).num_params() == count_params(cfg)


def test_photon_family_sizes():
    # Photon's family names (125M, 1.3B, 3B, 7B) must be what the presets actually build.
    expected = {"photon-125m": 125e6, "photon-1.3b": 1.3e9, "photon-3b": 2.7e9, "photon-7b": 6.9e9}
    for name, n in expected.items():
        got = count_params(load_config([name]).model)
        assert abs(got - n) / n < 0.06, (name, got)
    cfg = load_config(["photon-125m"]).model
    with torch.device("meta"):
        assert Transformer(cfg).num_params() == count_params(cfg)


def test_causal_and_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, seq_len=12)
    m = Transformer(cfg).eval()
    x = torch.randint(0, 100, (2, 12))
    logits, _ = m(x)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 100  # changing the future must not change the past
    logits2, _ = m(x2)
    assert torch.allclose(logits[:, :8], logits2[:, :8], atol=1e-5)
    _, loss = m(x, x)
    assert abs(loss.item() - torch.log(torch.tensor(100.0)).item()) < 1.0  # near-uniform at init


@pytest.mark.parametrize("tie,kv", [(True, None), (False, 2)])
def test_export_matches_hf_llama(tmp_path, tie, kv):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=kv, seq_len=32, tie_embeddings=tie)
    torch.manual_seed(1)
    m = Transformer(cfg).eval()
    export_hf(m.state_dict(), cfg, None, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.allclose(m(x)[0], hf(x).logits, atol=1e-5)
