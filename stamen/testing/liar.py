"""A lying server for tests: ``python -m stamen.testing.liar {noise,zero} server MODEL ...`` runs the
real ``stamen server`` with every span output it computes (inference steps and forwards) perturbed:
``noise`` adds 1 % relative Gaussian noise per position (‖noise‖ = 0.01 ‖output‖), ``zero`` returns
zeros. Only this entry point patches anything, so no option or setting of a production server can
turn it on. (A liar "computed by a model with other weights" needs no code: a server of another
random checkpoint under the same ``--dht-prefix``.)"""

from __future__ import annotations

import runpy
import sys

import torch

from stamen.models.span import SpanModel

LIES = ("noise", "zero")
NOISE = 0.01


def install(lie: str) -> None:
    """Make every ``SpanModel`` of this process return wrong outputs (``LIES``)."""
    if lie not in LIES:
        raise SystemExit(f"unknown lie {lie!r}: one of {', '.join(LIES)}")
    honest = SpanModel._run

    def lying_run(self, *args, **kwargs):
        out = honest(self, *args, **kwargs)
        if lie == "zero":
            return torch.zeros_like(out)
        noise = torch.randn_like(out, dtype=torch.float32)
        scale = out.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (out.float() + NOISE * scale * noise).to(out.dtype)

    SpanModel._run = lying_run


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m stamen.testing.liar {noise,zero} server MODEL [options]")
    install(sys.argv[1])
    sys.argv = ["stamen", *sys.argv[2:]]
    runpy.run_module("stamen", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
