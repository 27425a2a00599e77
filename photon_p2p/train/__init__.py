"""Local (inner) training of one silo: knows nothing of peers or networks."""

from photon_p2p.train.trainer import LocalTrainer, build_trainer

__all__ = ["LocalTrainer", "build_trainer"]
