"""The ``sparse-lth`` command: demo | search | convert | report.

Each subcommand is a ``_cmd_<name>(args)`` function and a parser block in ``build_parser``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import warnings
from typing import NoReturn

DEMO_SETTINGS = dict(model="lenet300", dataset="digits", rounds=12, iterations=1500, eval_every=50,
                     controls=("random_reinit",))


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (the usage text is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(_positive_int(part) for part in text.split(",") if part.strip())
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,64, got {text!r}")
    return sizes


def _parse_block(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        rows, cols = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        rows = cols = None
    if rows is None or rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"block must look like 32x32 or 16, got {text!r}")
    return rows, cols


def _run_search(config, out_dir: str, data_dir: str | None, threads: int | None, own_process: bool) -> int:
    import torch

    from sparse_lth.lottery import find_ticket
    from sparse_lth.run_files import PLOT_FILE

    from sparse_lth import distributed, heap

    if threads:
        torch.set_num_threads(threads)
    if own_process:  # the process is the search's: reuse each step's freed buffers (sparse_lth/heap.py)
        heap.keep_freed_memory()
    ticket = find_ticket(config, out_dir, data_dir=data_dir)
    if distributed.is_main():  # under torchrun: one table, from rank 0
        print(ticket.table())
        print(f"\nrun directory: {ticket.run_dir}\nplot: {ticket.run_dir / PLOT_FILE}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sparse_lth.lottery import LotteryConfig

    print("Finding a lottery ticket in LeNet-300-100 on the embedded 8x8 digits "
          f"({DEMO_SETTINGS['rounds']} pruning rounds, with the random-reinit control)...", file=sys.stderr)
    return _run_search(LotteryConfig(**DEMO_SETTINGS, seed=args.seed), args.out, None, args.threads, args.own_process)


def _cmd_search(args: argparse.Namespace) -> int:
    from sparse_lth.lottery import LotteryConfig

    controls = tuple(c for c in args.controls.split(",") if c) if args.controls else ()
    config = LotteryConfig(
        model=args.model, dataset=args.dataset, rounds=args.rounds, iterations=args.iterations,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        prune_fraction=args.prune, output_fraction=args.output_prune, conv_fraction=args.conv_prune,
        scope=args.scope, block=args.block, rewind_iteration=args.rewind, eval_every=args.eval_every,
        val_size=args.val_size, seed=args.seed, controls=controls, sparse_training=args.sparse_training,
    )
    return _run_search(config, args.out, args.data_dir, args.threads, args.own_process)


def _cmd_convert(args: argparse.Namespace) -> int:
    from sparse_lth.checkpoint import convert_checkpoint

    print(convert_checkpoint(args.src, args.dst, format=args.format, blocksize=args.block,
                             max_dense_bytes=args.max_dense_bytes, round=args.round, max_drop=args.max_drop))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sparse_lth.run_files import is_run_dir

    if is_run_dir(args.source):
        return _report_run(args)
    run_only = [flag for flag, value in (("--reps", args.reps), ("--batch-sizes", args.batch_sizes),
                                         ("--threads", args.threads)) if value is not None]
    if Path(args.source).is_dir():
        raise ValueError(f"{args.source} is a directory but not a run directory of a lottery search; report takes "
                         "a run directory or a pytest-benchmark JSON file")
    if run_only:
        raise ValueError(f"{' and '.join(run_only)} {'is' if len(run_only) == 1 else 'are'} for measuring a run "
                         f"directory's rounds; {args.source} is not a run directory")
    from sparse_lth.bench_report import make_report

    text, paths = make_report(args.source, args.out or "bench-report", stat=args.stat)
    print(text)
    for path in paths:
        print(f"plot: {path}")
    return 0


def _report_run(args: argparse.Namespace) -> int:
    """Bytes and CPU latency of every round of a run directory, dense against sparse."""
    from pathlib import Path

    import torch

    from sparse_lth.plots import plot_costs
    from sparse_lth.report_table import costs_table
    from sparse_lth.run_files import atomic_write_json
    from sparse_lth.run_report import DEFAULT_BATCH_SIZES, DEFAULT_REPS, measure_run

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or "run-report")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another folder for the plots (--out)")
    costs = measure_run(args.source, batch_sizes=args.batch_sizes or DEFAULT_BATCH_SIZES,
                        reps=args.reps or DEFAULT_REPS)
    print(costs_table(costs))
    paths = plot_costs(costs, out)
    atomic_write_json(costs.to_dict(), out / "costs.json")
    for path in paths:
        print(f"plot: {path}")
    print(f"data: {out / 'costs.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sparse_lth.lottery import CONTROLS, LotteryConfig
    from sparse_lth.data import DATASETS
    from sparse_lth.models import MODELS

    parser = _Parser(prog="sparse-lth", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = LotteryConfig()

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", default="runs", help="folder for run directories (default: runs)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")

    demo = sub.add_parser("demo", help="find a ticket on the embedded digits in about a minute")
    common(demo)
    # The demo's network is tiny: one thread is as fast and immune to a busy second core.
    demo.set_defaults(threads=1)
    demo.set_defaults(func=_cmd_demo)

    search = sub.add_parser("search", help="iterative magnitude pruning with rewinding (resumable)")
    common(search)
    search.add_argument("--model", choices=MODELS, default=defaults.model)
    search.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    search.add_argument("--data-dir", default=None, help="folder with the IDX files (or $SPARSE_LTH_DATA)")
    search.add_argument("--rounds", type=int, default=defaults.rounds, help="pruning rounds after the dense one")
    search.add_argument("--iterations", type=int, default=defaults.iterations, help="training steps per round")
    search.add_argument("--batch-size", type=int, default=defaults.batch_size)
    search.add_argument("--optimizer", choices=("adam", "sgd"), default=defaults.optimizer)
    search.add_argument("--lr", type=float, default=defaults.lr)
    search.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    search.add_argument("--prune", type=float, default=defaults.prune_fraction,
                        help="share of surviving weights removed per round (fully connected layers)")
    search.add_argument("--output-prune", type=float, default=None, help="output layer's rate (default: half)")
    search.add_argument("--conv-prune", type=float, default=None, help="conv layers' rate (default: the paper's)")
    search.add_argument("--scope", choices=("layerwise", "global"), default=defaults.scope)
    search.add_argument("--sparse-training", choices=("auto", "always", "never"), default=defaults.sparse_training,
                        help="train large sparse layers over their pattern (auto), all (always) or none "
                             f"(default: {defaults.sparse_training})")
    search.add_argument("--block", type=_parse_block, default=None, help="prune whole tiles, e.g. 32x32")
    search.add_argument("--rewind", type=int, default=0, help="rewind iteration k (0: reset to theta_0)")
    search.add_argument("--eval-every", type=int, default=defaults.eval_every)
    search.add_argument("--val-size", type=int, default=None, help="validation examples held out")
    search.add_argument("--controls", default="random_reinit",
                        help=f"comma-separated controls from {', '.join(CONTROLS)} ('' for none)")
    search.set_defaults(func=_cmd_search)

    convert = sub.add_parser("convert", help="dense checkpoint or run directory -> one sparse safetensors file")
    convert.add_argument("src", help="a .pt / .pth state dict, a .safetensors file, or a run directory")
    convert.add_argument("dst", help="the sparse .safetensors file to write")
    convert.add_argument("--format", choices=("csr", "bsr"), default="csr")
    convert.add_argument("--block", type=_parse_block, default=None, help="BSR block, e.g. 32 or 32x16")
    convert.add_argument("--max-dense-bytes", type=_positive_int, default=None,
                         help="largest dense size a sparse SRC may declare (default: max(1 GiB, 1024 x its size))")
    pick = convert.add_mutually_exclusive_group()
    pick.add_argument("--round", type=int, default=None, metavar="N",
                      help="run directory only: deploy round N (0 is the dense network; default: the newest round)")
    pick.add_argument("--max-drop", type=float, default=None, metavar="P",
                      help="run directory only: deploy the sparsest round whose test accuracy at the early-stop "
                           "iteration (the records' early_stop_test_accuracy) is at most P percentage points "
                           "below round 0's")
    convert.set_defaults(func=_cmd_convert)

    report = sub.add_parser("report", help="benchmark JSON (pytest --benchmark-json) or run directory "
                                           "-> tables and PNG plots")
    report.add_argument("source", metavar="JSON_OR_RUN_DIR",
                        help="the JSON file pytest-benchmark wrote (.json or .json.gz), or a search's run directory: "
                             "then each round's bytes and CPU latency are measured here, dense against sparse")
    report.add_argument("--out", default=None,
                        help="folder for the PNG plots (default: bench-report, or run-report for a run directory)")
    report.add_argument("--stat", choices=("median", "min", "mean"), default="median",
                        help="benchmark JSON: which timing statistic to compare (default: median)")
    report.add_argument("--reps", type=_positive_int, default=None,
                        help="run directory: interleaved timing repetitions per round; the median is shown "
                             "(default: 5; each takes a few ms per model and batch size on a small network)")
    report.add_argument("--batch-sizes", type=_batch_sizes, default=None,
                        help="run directory: batch sizes to time, comma-separated (default: 1,64)")
    report.add_argument("--threads", type=_positive_int, default=None,
                        help="run directory: torch CPU threads (default: torch's)")
    report.set_defaults(func=_cmd_report)
    return parser


def _one_line(error: BaseException) -> str:
    """An error's message on one line: a terminal user gets one line per error, never a dump."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None, own_process: bool = False) -> int:
    """Run the command line; errors a user can cause print one line on stderr and return 2.
    ``own_process``: the process is this command's alone (:func:`console_main`), so process-wide
    settings are the command's to make."""
    # torch warns on every sparse CSR/BSR tensor it builds; a command-line user cannot act on it.
    warnings.filterwarnings("ignore", message="Sparse (CSR|BSR) tensor support is in beta")
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2), already printed on one line
            return e.code if isinstance(e.code, int) else 2
        from sparse_lth import distributed

        args.own_process = own_process
        try:
            code = args.func(args)
        # The library raises ValueError naming the file or value at fault; OSError covers what
        # the file system refuses (permissions, a directory where a file belongs, a full disk).
        except (ValueError, OSError) as e:
            if distributed.is_main():  # under torchrun every rank stops; rank 0 says why, once
                print(f"sparse-lth {args.command}: error: {_one_line(e)}", file=sys.stderr)
            code = 2
        finally:
            ranks = distributed.world()
            distributed.shutdown()
        if ranks > 1:
            # A torchrun worker whose work is done and group destroyed leaves at once: letting the
            # C++ runtime tear down after it, rank 0 aborted now and then ("terminate called
            # without an active exception", SIGABRT after its files were written; 1 two-rank
            # search in 5-15 here, with or without a barrier before the teardown).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the user knows why it stopped; no traceback


def console_main() -> NoReturn:
    """The ``sparse-lth`` program (and ``python -m sparse_lth``): :func:`main` in a process of its own, then exit."""
    code = main(own_process=True)
    # torch leaves ~170,000 objects to the garbage collector, and the interpreter's collections on
    # the way out took 0.35 s of a 25 s search here. Frozen, they are skipped; nothing is lost:
    # every file the command wrote is closed by now, and the process ends anyway.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
