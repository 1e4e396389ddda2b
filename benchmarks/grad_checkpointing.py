"""Peak training memory with and without ``set_grad_checkpointing`` (DAS-ResNet-50, DAT-T++).

Each measurement runs in a fresh process: build the model and a batch, note the memory high-water
mark, run one forward + backward, note it again; the difference is what training the batch
needed beyond the weights. CPU: the process's peak resident set (``resource.ru_maxrss``); CUDA:
``torch.cuda.max_memory_allocated``. Gradients are the same either way (tests/test_timm_contract.py).

Usage: python benchmarks/grad_checkpointing.py [--batch 8] [--size 224] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODELS = ("das_resnet50", "dat_tiny")

_CHILD = """
import json, resource, sys, time
import torch, timm, das_lab
name, checkpointing, batch, size, device = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model = timm.create_model(name, num_classes=1000).to(device).train()
model.set_grad_checkpointing(checkpointing)
x = torch.randn(batch, 3, size, size, device=device)
def peak():
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak()
start = time.perf_counter()
model(x).logsumexp(1).sum().backward()
seconds = time.perf_counter() - start
print(json.dumps({"before": before, "after": peak(), "seconds": seconds}))
"""


def measure(name: str, checkpointing: bool, batch: int, size: int, device: str) -> dict[str, float]:
    """Memory high-water marks (MiB) before and after one training step, in a fresh process."""
    args = [sys.executable, "-c", _CHILD, name, "1" if checkpointing else "0", str(batch), str(size), device]
    run = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    print(
        f"one training step, batch {args.batch} x {args.size}px on {args.device}: memory beyond weights and batch (MiB)"
    )
    print("| model | plain | checkpointed | reduction | step s (plain / checkpointed) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in MODELS:
        plain, ckpt = (measure(name, flag, args.batch, args.size, args.device) for flag in (False, True))
        used = [m["after"] - m["before"] for m in (plain, ckpt)]
        print(
            f"| {name} | {used[0]:.0f} | {used[1]:.0f} | {1 - used[1] / used[0]:.0%} | "
            f"{plain['seconds']:.1f} / {ckpt['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
