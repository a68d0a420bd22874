"""Python side of gpu_check.sh: run ppo_throughput on a 1.3B-shaped OPT in bf16 at each --batches (PPO steps at the
first batch only) and add the HBM roofline: batch x bandwidth / model bytes (every decode step streams every weight
once), with the bandwidth measured by a device-to-device copy (the spec figure is printed beside it)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# peak HBM bandwidth by GPU name (bytes/s); an unknown GPU is measured with a device-to-device copy
HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
       "A100-SXM4-40GB": 1.56e12, "A100 80GB PCIe": 1.94e12, "A100-PCIE-40GB": 1.56e12, "A6000": 0.768e12,
       "L40S": 0.864e12, "A10": 0.6e12}


def measured_bandwidth() -> float:
    import torch

    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3)  # read + write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-check-out")
    ap.add_argument("--shape", default="opt-1.3b")
    ap.add_argument("--batches", default="8,32", help="generation batches; PPO steps at the first")
    ap.add_argument("--no-deepspeed-he", action="store_true", help="leave DeepSpeed's HE to a separate run")
    args = ap.parse_args()
    import torch

    import ppo_throughput as bench

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in HBM.items() if k in name), None)
    copy_bw = measured_bandwidth()
    out = {"gpu": name, "peak_bytes_per_s": peak, "copy_bytes_per_s": copy_bw, "runs": {}}
    for i, batch in enumerate(int(b) for b in args.batches.split(",")):
        res = bench.main(["--shape", args.shape, "--precision", "bf16", "--batch", str(batch), "--prompt-len", "32",
                          "--new-tokens", "64", "--repeats", "5", "--ppo-steps", "5"]
                         + (["--real-model", "--real-batch", "8"] if i == 0
                            else ["--ppo-stages", "", "--skip-naive"])
                         + ([] if args.no_deepspeed_he else ["--deepspeed-he"]))
        gen = res["generation"]
        model_bytes = gen["params"] * 2  # bf16
        roofline = batch * copy_bw / model_bytes
        res["hbm"] = {"model_bytes": model_bytes, "roofline_tokens_per_s": roofline,
                      "spec_roofline_tokens_per_s": batch * peak / model_bytes if peak else None}
        print(f"\nHBM roofline ({name}, batch {batch}): batch x {copy_bw / 1e12:.2f} TB/s measured (device copy"
              f"{f'; spec {peak / 1e12:.2f} TB/s' if peak else ''}) / {model_bytes / 1e9:.2f} GB = {roofline:.0f} "
              f"tokens/s")
        for k in ("a_portable_z3", "a_prime_compiled_z3", "b_naive_z3", "c_plain", "d_deepspeed_he_z0",
                  "d_deepspeed_he_z3"):
            if f"{k}_tokens_per_s" in gen:
                frac = gen[f"{k}_tokens_per_s"] / roofline
                res["hbm"][f"{k}_fraction"] = frac
                print(f"  {k:22s} {gen[f'{k}_tokens_per_s']:9.1f} tokens/s = {100 * frac:5.1f}% of the roofline")
        out["runs"][f"batch{batch}"] = res
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
