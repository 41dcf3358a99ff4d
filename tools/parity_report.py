"""Print how far x3dnet is from the original on the reference fixtures: max |p_ours - p_original|.

    python tools/parity_report.py [FIXTURES_DIR ...]   (default: ../shared/fixtures, else tests/fixtures)

Each checkpoint goes through the production loader; the SlowFast file of each fixture records its
training clip, which the pytorchvideo and mmaction2 files (weights only) are loaded against.
"""

import sys
from pathlib import Path

import torch

from x3dnet import X3D, load_checkpoint, load_weights

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"slowfast": "slowfast.pyth", "pytorchvideo": "ptv.pyth", "mmaction2": "mmaction2.pth"}


def main(dirs: list[Path]) -> None:
    print(f"{'fixture':8}  {'layout':12}  {'size':22}  max |dp|")
    for folder in dirs:
        for io_path in sorted(folder.glob("*_io.pt")):
            name = io_path.name.removesuffix("_io.pt")
            io = torch.load(io_path, weights_only=True)
            config = load_checkpoint(folder / f"{name}_{LAYOUTS['slowfast']}").config
            for layout, suffix in LAYOUTS.items():
                model = X3D(config).eval()
                load_weights(model, folder / f"{name}_{suffix}")
                for size in ("train", "test"):
                    x = io[f"x_{size}"].float()
                    with torch.inference_mode():
                        diff = (model(x).softmax(1) - io[f"probs_{size}"]).abs().max().item()
                    shape = "x".join(map(str, x.shape[2:]))
                    print(f"{name:8}  {layout:12}  {size + ' ' + shape:22}  {diff:.2e}")


if __name__ == "__main__":
    shared = ROOT.parent / "shared" / "fixtures"
    main([Path(p) for p in sys.argv[1:]] or [shared if shared.exists() else ROOT / "tests" / "fixtures"])
