"""Test helper: `photon-peer` whose pseudo-gradient is tampered with before it is sent (attack code stays here).

Usage: ``python _adversarial_peer.py ATTACK -- <photon-peer args>``; ATTACK is ``scale:F`` (Δ × F) or ``noise``
(Gaussian noise with the norm of each tensor of Δ). bench/scenarios.py (--silo tamper:ATTACK) has the same
wrapper for the benchmark.
"""

from __future__ import annotations

import sys

import torch

from photon_p2p.federation import averaging


def tamper(attack: str, deltas: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for d in deltas:
            if attack.startswith("scale:"):
                d.mul_(float(attack.split(":", 1)[1]))
            elif attack == "noise":
                noise = torch.randn_like(d)
                d.copy_(noise * (float(d.norm()) / max(float(noise.norm()), 1e-12)))
            else:
                raise SystemExit(f"_adversarial_peer: unknown attack {attack!r}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != "--":
        raise SystemExit("usage: _adversarial_peer.py ATTACK -- <photon-peer args>")
    attack, original = argv[0], averaging.PseudoGradientAverager.average

    def tampered(self, deltas, *args, **kwargs):  # noqa: ANN001, ANN202
        tamper(attack, deltas)
        return original(self, deltas, *args, **kwargs)

    averaging.PseudoGradientAverager.average = tampered
    from photon_p2p.cli import main as cli_main

    return cli_main(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
