#!/usr/bin/env python3
"""The projection tables of docs/scaling.md: data-parallel and FSDP evaluation on 8 to 256 GPUs.

Usage:
    python3 scripts/scaling_projection.py

Model inputs (parameters per block, parameters outside the blocks, FLOPs per token) are the figures
`cargo run --release -p icl-models --example scaling_inputs` prints from the models' own
`forward_flops` and parameter declarations; the hardware figures are the assumptions stated in
docs/scaling.md. Everything else is computed here; change an assumption and rerun.
"""
import math

# Hardware (H100 SXM class), see docs/scaling.md.
ACHIEVED_FLOPS = 400e12  # bf16 forward, ~40% of the 989 TFLOP/s dense peak
NVLINK_BW = 350e9  # bytes/s per GPU an all-gather achieves inside an 8-GPU NVSwitch node
NETWORK_BW = 40e9  # bytes/s per GPU across nodes (one 400 Gb/s NIC per GPU, ~80% achieved)
NVLINK_STEP = 5e-6  # seconds of latency per ring step inside a node
NETWORK_STEP = 10e-6  # seconds per ring step across nodes
GPUS_PER_NODE = 8
MAX_TOKENS_PER_FORWARD = 16384  # per rank, bounded by activation memory
START_SECONDS = 5.0  # process, CUDA and NCCL start-up
READ_BW = 1.5e9  # bytes/s of checkpoint each rank reads from shared storage
BYTES_PER_PARAM = 2  # bf16

# From `scaling_inputs` (seq 512, every position scored).
MODELS = {
    "Llama-2-7B": dict(layers=32, block_params=202.38e6, outer_params=262.1e6, flops_per_token=13.349e9),
    "Llama-2-70B": dict(layers=80, block_params=855.65e6, outer_params=524.3e6, flops_per_token=138.099e9),
}
WORKLOADS = {
    "a 10M-token suite": 10e6,
    "one LAMBADA-size task (5,153 rows, ~0.41M tokens)": 0.41e6,
}
GPUS = [8, 16, 32, 64, 128, 256]


def all_gather_seconds(gathered_bytes, ranks):
    """Ring all-gather: each rank receives (N-1)/N of the buffer; the slowest link sets the pace."""
    if ranks == 1:
        return 0.0
    bw, step = (NVLINK_BW, NVLINK_STEP) if ranks <= GPUS_PER_NODE else (NETWORK_BW, NETWORK_STEP)
    return (ranks - 1) / ranks * gathered_bytes / bw + (ranks - 1) * step


def project(model, total_tokens, ranks):
    m = MODELS[model]
    params = m["layers"] * m["block_params"] + m["outer_params"]
    tokens = total_tokens / ranks
    forwards = math.ceil(tokens / MAX_TOKENS_PER_FORWARD)
    per_forward = tokens / forwards
    layer_compute = m["flops_per_token"] * per_forward / ACHIEVED_FLOPS / m["layers"]
    layer_gather = all_gather_seconds(BYTES_PER_PARAM * m["block_params"], ranks)
    outer_gather = all_gather_seconds(BYTES_PER_PARAM * m["outer_params"], ranks)
    compute = m["flops_per_token"] * tokens / ACHIEVED_FLOPS
    # FSDP: the next layer's gather runs during this layer's compute, so a layer costs the longer of
    # the two; the embedding/head gather is not hidden.
    fsdp_loop = forwards * (m["layers"] * max(layer_compute, layer_gather) + outer_gather)
    fsdp = START_SECONDS + BYTES_PER_PARAM * params / ranks / READ_BW + fsdp_loop
    # Data parallel: every rank reads and holds the whole model, and needs no per-forward exchange.
    fits = BYTES_PER_PARAM * params < 60e9  # leave room for activations on an 80 GB GPU
    dp = START_SECONDS + BYTES_PER_PARAM * params / READ_BW + compute if fits else None
    one_gpu = m["flops_per_token"] * total_tokens / ACHIEVED_FLOPS
    return dict(
        tokens=tokens, per_forward=per_forward, layer_compute=layer_compute, layer_gather=layer_gather,
        shard_mb=BYTES_PER_PARAM * m["block_params"] / ranks / 1e6, fsdp=fsdp, dp=dp,
        fsdp_loop_eff=compute / fsdp_loop, fsdp_eff=one_gpu / ranks / fsdp,
        dp_eff=None if dp is None else one_gpu / ranks / dp,
    )


def main():
    for workload, total in WORKLOADS.items():
        for model in MODELS:
            print(f"\n{model}, {workload}\n")
            print("| GPUs | tokens per rank | tokens per forward | layer compute ms | layer all-gather ms "
                  "| per-rank chunk MB | FSDP compute share | FSDP s (speed-up vs linear) | DP s (vs linear) |")
            print("|---|---|---|---|---|---|---|---|---|")
            for n in GPUS:
                p = project(model, total, n)
                dp = "does not fit" if p["dp"] is None else f"{p['dp']:.1f} ({p['dp_eff'] * 100:.0f}%)"
                print(f"| {n} | {p['tokens']:,.0f} | {p['per_forward']:,.0f} | {p['layer_compute'] * 1e3:.1f} "
                      f"| {p['layer_gather'] * 1e3:.1f} | {p['shard_mb']:.2f} | {p['fsdp_loop_eff'] * 100:.0f}% "
                      f"| {p['fsdp']:.1f} ({p['fsdp_eff'] * 100:.0f}%) | {dp} |")
    print("\nTokens per forward above which a layer's all-gather hides behind its compute "
          "(bandwidth term, N -> large):")
    for name, bw in [("NVLink node", NVLINK_BW), ("across nodes", NETWORK_BW)]:
        print(f"- {name}: {ACHIEVED_FLOPS / bw:,.0f} tokens")


if __name__ == "__main__":
    main()
