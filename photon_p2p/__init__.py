"""photon_p2p: serverless federated pre-training of decoder-only LLMs (Photon's recipe over a hivemind DHT)."""

__version__ = "0.1.0"
