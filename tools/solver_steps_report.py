"""SlowFast's three SGD steps (tests/fixtures/train) on a device, under each cuDNN setting, and in fp64:
how far the gradient norms and momentum buffers end from the original's. On an H200 this showed that the
second setting's 1.5e-3 in fp32 momentum (tests/test_solver.py) is not cuDNN's algorithms.

    python tools/solver_steps_report.py [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_solver  # noqa: E402 (the fixtures' loaders)

from x3dnet.backends import cuda_fp32  # noqa: E402
from x3dnet.layouts import to_native  # noqa: E402
from x3dnet.train import SolverConfig, build_optimizer, lr_at  # noqa: E402


def report(case: str, device: str, dtype: torch.dtype = torch.float32) -> str:
    ref = test_solver._reference(case)
    model = test_solver._tiny(ref, dtype).to(device)
    cfg = SolverConfig(**ref["solver"])
    opt = build_optimizer(model, cfg)
    norms = []
    for k, epoch in enumerate(ref["epochs"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, epoch)
        opt.zero_grad()
        x = ref["inputs"][torch.tensor(ref["index"][k])].to(device, dtype)
        F.cross_entropy(model(x), ref["labels"][k].to(device)).backward()
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        norms.append(f"{abs(norm / ref['grad_norms'][k] - 1):.1e}")
        opt.step()
    params = dict(model.named_parameters())
    gaps = {}
    for name, buffer in to_native(ref["momentum_buffers"], "slowfast").items():
        got = opt.state[params[name]]["momentum_buffer"].cpu().double()
        gaps[name] = ((got - buffer.double()).abs().max() / buffer.abs().max().clamp_min(1e-3)).item()
    worst = sorted(gaps.items(), key=lambda kv: -kv[1])[:3]
    return f"gradient norms (relative) {norms}; momentum {[(n, f'{v:.1e}') for n, v in worst]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    cuda_fp32()
    settings = [("default", {})]
    if device.startswith("cuda"):
        settings += [("deterministic", {"deterministic": True}), ("autotuned", {"benchmark": True}),
                     ("cuDNN off", {"enabled": False})]
    for case in ("tiny_a_s2_fp32", "tiny_a_s1_fp32"):
        for label, setting in settings:
            saved = {k: getattr(torch.backends.cudnn, k) for k in ("deterministic", "benchmark", "enabled")}
            for k, v in setting.items():
                setattr(torch.backends.cudnn, k, v)
            try:
                print(f"{case} on {device}, {label}: {report(case, device)}", flush=True)
            finally:
                for k, v in saved.items():
                    setattr(torch.backends.cudnn, k, v)
    print(f"tiny_a_s2_fp32's steps in fp64 on {device}: {report('tiny_a_s2_fp32', device, torch.float64)}")


if __name__ == "__main__":
    main()
