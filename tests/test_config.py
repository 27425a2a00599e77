"""Config tree: presets load, overlays and overrides apply, bad keys and types are one-line errors."""

import dataclasses
from pathlib import Path

import pytest

from photon_p2p.config import ConfigError, load_config, parse_override

PEER = "/ip4/1.2.3.4/tcp/5/p2p/QmXZLnUg5QhJd5WQQ9uBs7k1fEMxXeqkbbNfvH6FK9Sa6N"


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
    cfg = load_config([str(overlay)], ["train.batch_size=8", f"network.initial_peers=['{PEER}']"])
    assert cfg.model.d_model == 128  # from tiny
    assert cfg.federation.run_id == "silo-a"
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 8
    assert cfg.network.initial_peers == [PEER]


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
        load_config(["tiny"], override.split(" "))
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


# ---- presets ship inside the package ---------------------------------------------------------------------------

def test_presets_ship_in_package_and_configs_dir_is_an_identical_copy():
    """photon_p2p/configs/ is the source (what --config NAME reads, in every install); configs/ at the top of the
    repo holds byte-identical copies for users to copy and edit. Symlinks do not survive wheels and sdists."""
    from photon_p2p.config import PRESET_DIR, preset_names

    repo_configs = Path(__file__).resolve().parent.parent / "configs"
    shipped = {f.name: f.read_bytes() for f in PRESET_DIR.iterdir() if f.name.endswith(".yaml")}
    copies = {f.name: f.read_bytes() for f in repo_configs.glob("*.yaml")}
    assert set(shipped) == set(copies), "configs/ and photon_p2p/configs/ list different presets"
    for name, data in shipped.items():
        assert copies[name] == data, f"configs/{name} differs: cp photon_p2p/configs/{name} configs/{name}"
    assert {"tiny", "photon-125m", "diloco-tiny"} <= set(preset_names())


def test_preset_found_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: the preset must come from the package
    assert load_config(["tiny"]).name == "tiny"
    assert load_config(["diloco-tiny"]).federation.outer_optimizer == "nesterov"  # extends: tiny.yaml, a preset
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("extends: tiny\nname: mine\n")
    assert load_config([str(overlay)]).model.d_model == 128


def test_missing_file_lists_presets():
    with pytest.raises(ConfigError, match="config file not found: tiny2 .*presets: .*tiny"):
        load_config(["tiny2"])


def test_peer_overlays_load():
    root = Path(__file__).resolve().parent.parent / "peers"
    for name in ("silo-a.yaml", "silo-b.yaml", "volunteer.yaml"):
        assert load_config([str(root / name)]).model.d_model == 128


# ---- one validation step ---------------------------------------------------------------------------------------

def _numeric_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, f"{prefix}{f.name}.")
        elif "int" in str(f.type) or "float" in str(f.type):
            yield f"{prefix}{f.name}"


def test_every_numeric_key_has_a_range():
    from photon_p2p.config import RANGES, Config

    keys = set(_numeric_keys(Config()))
    assert keys - set(RANGES) == set(), "add these keys to config.RANGES"
    assert set(RANGES) - keys == set(), "RANGES names keys that do not exist"


@pytest.mark.parametrize("override,needle", [
    ("train.lr=-1", "'train.lr' must be > 0, got -1.0"),
    ("train.lr=.nan", "'train.lr' must be a finite number"),
    ("train.lr=.inf", "'train.lr' must be a finite number"),
    ("train.beta2=1.0", "'train.beta2' must be in [0, 1)"),
    ("train.weight_decay=-0.1", "'train.weight_decay' must be >= 0"),
    ("train.eps=0", "'train.eps' must be > 0"),
    ("train.log_every=0", "'train.log_every' must be >= 1"),
    ("train.checkpoint_every=0", "'train.checkpoint_every' must be >= 1"),
    ("train.min_lr_ratio=2", "'train.min_lr_ratio' must be in [0, 1]"),
    ("train.device=gpu", "'train.device' must be auto, cpu, cuda or cuda:N"),
    ("model.norm_eps=0", "'model.norm_eps' must be > 0"),
    ("model.n_kv_heads=0", "'model.n_kv_heads' must be >= 1"),
    ("data.seed=-1", "'data.seed' must be >= 0"),
    ("federation.outer_lr=0", "'federation.outer_lr' must be > 0"),
    ("federation.outer_momentum=1", "'federation.outer_momentum' must be in [0, 1)"),
    ("federation.run_id=''", "'federation.run_id' must be non-empty"),
    ("federation.run_id=my.run", "contain no '.'"),
    ("federation.round_deadline=4", "federation.round_deadline (4s) must exceed"),
    ("federation.record_ttl=20", "federation.record_ttl (20s) must exceed federation.heartbeat_interval (30s)"),
    ("federation.min_group_size=33", "federation.min_group_size (33) must be <= federation.target_group_size"),
    ("federation.max_rollbacks=0", "'federation.max_rollbacks' must be >= 1"),
    ("federation.divergence_loss=-1", "'federation.divergence_loss' must be >= 0"),
    ("federation.straggler_wait=-1", "'federation.straggler_wait' must be >= 0"),
    ("federation.outer_optimizer=adam", "must be one of fedavg, fedmom, nesterov"),
    ("network.request_timeout=0", "'network.request_timeout' must be > 0"),
    ("network.announce_maddrs=[/ip4/1.2.3.4/tcp/0]", "needs an explicit, non-zero port"),
    ("network.announce_maddrs=[/ip4/1.2.3.4]", "needs an explicit, non-zero port"),
    ("network.initial_peers=[/ip4/1.2.3.4/tcp/5]", "missing /p2p/<peer id>"),
    ("network.host_maddrs=[nonsense]", "invalid multiaddr in network.host_maddrs / --host-maddrs: 'nonsense'"),
    ("observe.prometheus_port=70000", "'observe.prometheus_port' must be in [0, 65535]"),
    ("name=''", "'name' must not be empty"),
    ("federation.helper=true network.client_mode=true", "federation.helper needs a reachable peer"),
    ("federation.helper=true federation.round_clock=steps", "federation.helper needs federation.round_clock: swarm"),
])
def test_validation_names_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(["tiny"], override.split(" "))  # one or more KEY=VALUE
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_validation_accepts_good_values():
    cfg = load_config(["tiny"], ["network.announce_maddrs=[/ip4/203.0.113.7/tcp/31337]",
                                 "federation.round_deadline=4.5", "federation.record_ttl=31", "train.warmup_steps=0",
                                 "train.grad_clip=0", "train.device=cuda:1", "federation.outer_momentum=0.9"])
    assert cfg.federation.record_ttl == 31.0


def test_identity_file_checked_before_the_dht(tmp_path):
    from photon_p2p.config import check_identity_file

    check_identity_file(str(tmp_path / "missing.key"))  # a missing file is fine: it is created
    for name, data in (("garbage.key", b"this is not a key \x00\xff\x13"), ("empty.key", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(ConfigError, match=f"identity file {bad} .*is not a private key"):
            load_config(["tiny"], [f"network.identity_path={bad}"])
    with pytest.raises(ConfigError, match="is not a file"):
        check_identity_file(str(tmp_path))


def test_identity_file_written_by_hivemind_passes(tmp_path):
    from hivemind.p2p import P2P

    from photon_p2p.config import check_identity_file

    key = tmp_path / "id.key"
    P2P.generate_identity(str(key))
    check_identity_file(str(key))
