"""The paper's ticket deployed: LeNet-300-100 on Fashion-MNIST, dense against sparsified, with and
without the calibrated per-layer choice, at batch 1, 64 and 1024.

The ticket comes from a run directory (``--run``; the round whose weights left are closest to
``--density``), or from a short search run here (``--rounds`` at the paper's rates, few
iterations: the mask's structure is what the latency depends on, not the last point of accuracy).
Variants, all computing the masked model (checked against it):

* ``dense``: the masked ``nn.Linear`` model;
* ``rule``: ``sparsify(model, mask, max_density=1.0)``, each call choosing its kernel by the
  density-and-batch rule;
* ``calibrated``: ``sparsify(..., example_inputs=x)`` for that batch's ``x``: each layer's paths
  timed inside the model and the fastest kept.

Timing: the three variants alternate in short bursts (bench/harness.interleaved), medians per
call; torch's threads as given (``--threads``, default 2 as CI's machine). Prints a table and
writes JSON (``--json``).

    python bench/ticket_lenet.py --rounds 12 --iterations 300 --json bench/results/ticket-lenet.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from harness import interleaved
from sparse_lth import LotteryConfig, Mask, build_model, find_ticket, load_dataset, run_files, sparsify
from sparse_lth.nn.calibrate import calibration_table


def ticket(run: Path | None, density: float, rounds: int, iterations: int) -> tuple[nn.Module, Mask, Path]:
    """The trained model and mask of the round closest to ``density`` weights left."""
    if run is None:
        out = Path(tempfile.mkdtemp(prefix="ticket-lenet-"))
        config = LotteryConfig(model="lenet300", dataset="fashion-mnist", rounds=rounds, iterations=iterations,
                               eval_every=iterations, controls=())
        run = find_ticket(config, out).run_dir
    rounds_done = run_files.completed_rounds(run)
    picked = None
    for r in rounds_done:
        mask, trained, _ = run_files.read_round(run, r)
        left = Mask(mask).density()
        if picked is None or abs(left - density) < abs(picked[0] - density):
            picked = (left, mask, trained)
    _, mask, trained = picked  # type: ignore[misc]
    data = load_dataset("fashion-mnist", val_size=5000)
    model = build_model("lenet300", data.input_shape, data.num_classes)
    model.load_state_dict(trained)
    return model.eval(), Mask(mask), run


def measure(dense: nn.Module, mask: Mask, batch: int, bursts: int) -> dict:
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(batch))
    rule = sparsify(copy.deepcopy(dense), mask=mask, max_density=1.0).eval()
    calibrated = sparsify(copy.deepcopy(dense), mask=mask, max_density=1.0, example_inputs=x).eval()
    models = {"dense": dense, "rule": rule, "calibrated": calibrated}
    with torch.inference_mode():
        expected = dense(x)
        for name, m in models.items():
            torch.testing.assert_close(m(x), expected, rtol=1e-4, atol=1e-4, msg=f"{name} at batch {batch}")
        fns = {name: (lambda m=m: m(x)) for name, m in models.items()}
        calls = {name: max(1, 4096 // batch) for name in models}
        result = interleaved(fns, "cpu", bursts, calls)
    seconds = result.seconds
    return {"batch": batch, "ms": {k: v * 1e3 for k, v in seconds.items()},
            "rule_vs_dense": seconds["dense"] / seconds["rule"],
            "calibrated_vs_dense": seconds["dense"] / seconds["calibrated"],
            "choices": {n: m.backend for n, m in calibrated.named_modules() if hasattr(m, "calibration")},
            "table": calibration_table(calibrated)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None, help="a search's run directory (else one is made)")
    ap.add_argument("--density", type=float, default=0.07, help="weights left in the round to deploy")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--bursts", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, mask, run = ticket(args.run, args.density, args.rounds, args.iterations)
    mask.apply(model)
    print(f"ticket: {run}, {100 * mask.density():.2f}% of weights left; per layer "
          + ", ".join(f"{n} {100 * t.float().mean():.1f}%" for n, t in mask.items()))
    rows = [measure(model, mask, int(b), args.bursts) for b in args.batches.split(",")]
    print(f"\n{'batch':>6} {'dense ms':>9} {'rule ms':>9} {'calib ms':>9} {'rule x':>7} {'calib x':>8}  choices")
    for r in rows:
        ms = r["ms"]
        print(f"{r['batch']:>6} {ms['dense']:>9.4f} {ms['rule']:>9.4f} {ms['calibrated']:>9.4f} "
              f"{r['rule_vs_dense']:>7.2f} {r['calibrated_vs_dense']:>8.2f}  {r['choices']}")
    for r in rows:
        print(f"\nbatch {r['batch']}:\n{r['table']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                "torch": torch.__version__, "run": str(run), "density": mask.density(),
                "layers": {n: float(t.float().mean()) for n, t in mask.items()}, "rows": rows}
        args.json.write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
