"""Time one training step (forward + backward) of a shapes-tiny-sized denoiser on this CPU in fp32 and under bf16
autocast, and say whether the CPU has native bf16 kernels (what `bf16_cpu: true` in a recipe checks).

    python benchmarks/bf16_cpu.py --steps 3
"""

from __future__ import annotations

import argparse
import time

import torch

from mmdlm import MMDLMConfig, MMDLMForConditionalGeneration
from mmdlm.training.trainer import cpu_has_bf16


def step_seconds(model: torch.nn.Module, ids: torch.Tensor, bf16: bool, steps: int) -> float:
    """Mean seconds of ``steps`` forward + backward passes (after one warm-up step)."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=290, help="row length (a shapes-tiny drawing row: ~290 tokens)")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = MMDLMConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, mask_token_id=2)
    model = MMDLMForConditionalGeneration(cfg).train()
    ids = torch.randint(0, 1024, (args.batch_size, args.length))
    print(f"native bf16 kernels: {cpu_has_bf16()}; threads: {torch.get_num_threads()}")
    fp32 = step_seconds(model, ids, False, args.steps)
    bf16 = step_seconds(model, ids, True, args.steps)
    print(f"fp32: {fp32:.2f} s/step, bf16 autocast: {bf16:.2f} s/step ({bf16 / fp32:.1f}x fp32)")


if __name__ == "__main__":
    main()
