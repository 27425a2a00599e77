"""Config tree: presets load, overlays and overrides apply, bad keys and types are one-line errors."""

import pytest

from photon_p2p.config import ConfigError, load_config, parse_override


def test_presets_load():
    for name in ["tiny", "photon-125m", "photon-1.3b", "photon-3b", "photon-7b", "diloco-tiny", "diloco-125m"]:
        cfg = load_config([name])
        assert cfg.name == name


def test_photon_shapes():
    shapes = {"photon-125m": (768, 12, 12), "photon-1.3b": (2048, 16, 24), "photon-3b": (2560, 20, 32),
              "photon-7b": (4096, 32, 32)}
    for name, (d, h, n) in shapes.items():
        m = load_config([name]).model
        assert (m.d_model, m.n_heads, m.n_layers, m.seq_len) == (d, h, n, 2048)


def test_overlay_extends_and_overrides(tmp_path):
    overlay = tmp_path / "silo.yaml"
    overlay.write_text("extends: tiny\nfederation:\n  run_id: silo-a\ntrain:\n  lr: 1\n")
    cfg = load_config([str(overlay)], ["train.batch_size=8", "network.initial_peers=['/ip4/1.2.3.4/tcp/5']"])
    assert cfg.model.d_model == 128  # from tiny
    assert cfg.federation.run_id == "silo-a"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.network.initial_peers == ["/ip4/1.2.3.4/tcp/5"]


@pytest.mark.parametrize("override,needle", [
    ("train.lrr=1", "train.lrr"),
    ("bogus.x=1", "bogus"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.batch_size=true", "train.batch_size"),
    ("federation.compression=zip", "federation.compression"),
    ("model.n_heads=5", "n_heads"),
    ("nokey", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["tiny"], [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config([str(bad)])


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["no-such-preset"])


def test_parse_override_yaml_values():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=hello") == ("a.b", "hello")
