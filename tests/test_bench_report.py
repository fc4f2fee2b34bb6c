"""sparse_lth.bench_report on a synthetic pytest-benchmark JSON: speed-ups, bytes ratios and
crossover densities against values computed by hand, and the CLI writing its plots.

Two kinds of JSON: ``synthetic()`` is what the suite wrote before it measured ratios itself
(the report falls back to dense time / time and says so); ``synthetic_interleaved()`` carries
each sparse benchmark's interleaved speed-up, set apart from dense time / time on purpose, so a
test can tell which one the report used."""

import copy
import gzip
import json
import math

import matplotlib.figure
import pytest

from sparse_lth.bench_report import (
    Crossover,
    crossover_density,
    crossovers,
    format_report,
    kernel_results,
    machine_summary,
    make_report,
    vector_isa,
    write_plots,
)
from sparse_lth.cli import main


def _kernel(backend, structure, density, N, median, *, weight_bytes, shape="64x64", baseline=False):
    M, K = map(int, shape.split("x"))
    return {
        "group": f"matmul {shape} N={N} fp32 cpu", "name": f"test_matmul[{backend}-{density}-{N}]",
        "stats": {"median": median, "min": median / 2, "mean": median * 1.1, "rounds": 5},
        "extra_info": {
            "kind": "kernel", "shape": shape, "M": M, "K": K, "N": N, "dtype": "fp32", "device": "cpu",
            "backend": backend, "structure": structure, "density": density * 1.01, "density_nominal": density,
            "weight_bytes": weight_bytes, "dense_bytes": 4 * M * K, "flops": int(2 * density * M * K * N),
            "baseline": baseline,
        },
    }


def synthetic() -> dict:
    """Dense takes 1.0 ms at N=1 and 8.0 ms at N=16; one CSR backend at three densities."""
    dense_bytes = 4 * 64 * 64  # 16384
    benches = [
        _kernel("torch_dense", "dense", 1.0, 1, 1.0e-3, weight_bytes=dense_bytes, baseline=True),
        _kernel("torch_dense", "dense", 1.0, 16, 8.0e-3, weight_bytes=dense_bytes, baseline=True),
        # N=1: speed-ups 4, 2, 0.5 at densities 0.01, 0.1, 0.2 -> crosses between 10% and 20%
        _kernel("ours_cpu", "unstructured", 0.01, 1, 0.25e-3, weight_bytes=400),
        _kernel("ours_cpu", "unstructured", 0.1, 1, 0.5e-3, weight_bytes=3300),
        _kernel("ours_cpu", "unstructured", 0.2, 1, 2.0e-3, weight_bytes=6600),
        # N=16: wins everywhere (speed-ups 8, 4, 2) -> at or above 20%
        _kernel("ours_cpu", "unstructured", 0.01, 16, 1.0e-3, weight_bytes=400),
        _kernel("ours_cpu", "unstructured", 0.1, 16, 2.0e-3, weight_bytes=3300),
        _kernel("ours_cpu", "unstructured", 0.2, 16, 4.0e-3, weight_bytes=6600),
        # a block backend that never wins at N=1
        _kernel("scipy", "block16", 0.1, 1, 4.0e-3, weight_bytes=1700),
        _kernel("scipy", "block16", 0.2, 1, 5.0e-3, weight_bytes=3350),
        # timings missing (a --benchmark-disable run): ignored
        {**_kernel("scipy", "block16", 0.01, 1, 1.0, weight_bytes=1), "stats": None},
        # model and masked-step records
        {"group": "m", "name": "m1", "stats": {"median": 2e-3},
         "extra_info": {"kind": "model", "model": "mlp", "variant": "dense", "batch": 1, "device": "cpu",
                        "density": 0.1, "weight_bytes": 1000}},
        {"group": "m", "name": "m2", "stats": {"median": 5e-4},
         "extra_info": {"kind": "model", "model": "mlp", "variant": "sparse-csr", "batch": 1, "device": "cpu",
                        "density": 0.1, "weight_bytes": 200, "sparse_layers": ["0", "2"]}},
        {"group": "s", "name": "s1", "stats": {"median": 1.0e-3},
         "extra_info": {"kind": "masked_step", "model": "lenet300", "variant": "plain", "batch": 60, "device": "cpu"}},
        {"group": "s", "name": "s2", "stats": {"median": 1.2e-3},
         "extra_info": {"kind": "masked_step", "model": "lenet300", "variant": "masked", "batch": 60, "device": "cpu",
                        "ratio_interleaved": 1.15, "ratio_target": 1.3}},
    ]
    return {"machine_info": {"node": "test", "cpu": {"brand_raw": "CPU", "count": 2, "flags": ["avx", "avx2"]}},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benches}


#: The interleaved speed-ups of synthetic_interleaved(): (backend, N, density) -> ratio. Each is
#: half of dense time / time (ours_cpu) or a quarter of it (scipy), so the two cannot be confused.
INTERLEAVED = {("ours_cpu", 1, 0.01): 2.0, ("ours_cpu", 1, 0.1): 1.0, ("ours_cpu", 1, 0.2): 0.25,
               ("ours_cpu", 16, 0.01): 4.0, ("ours_cpu", 16, 0.1): 2.0, ("ours_cpu", 16, 0.2): 1.0,
               ("scipy", 1, 0.1): 0.0625, ("scipy", 1, 0.2): 0.05}
MACHINE = {"cpu_model": "AMD EPYC 9R14", "cpu_isa": "AVX-512", "cpu_count": 2, "threads": 2}


def synthetic_interleaved() -> dict:
    """synthetic() as the suite writes it now: interleaved ratios and the machine in extra_info."""
    data = copy.deepcopy(synthetic())
    for load, bench in zip((0.5, 1.5, 2.5), data["benchmarks"][:3]):
        bench["extra_info"]["loadavg_1m"] = load
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        info.update(MACHINE)
        key = (info.get("backend"), info.get("N"), info.get("density_nominal"))
        if key in INTERLEAVED:
            info.update(speedup_interleaved=INTERLEAVED[key], ratio_stat="median", interleaved_rounds=7)
        if info.get("kind") == "model" and info["variant"] != "dense":
            info.update(speedup_interleaved=3.0, ratio_stat="median")  # dense / median says 4.0
    return data


def _by(results, backend, N, density):
    return next(r for r in results if r.backend == backend and r.N == N and r.density == density)


def test_speedups_and_bytes_against_hand_values():
    results = kernel_results(synthetic())
    assert len(results) == 10  # the one without stats is left out, models / steps are not kernels
    assert _by(results, "ours_cpu", 1, 0.01).speedup == pytest.approx(4.0)
    assert _by(results, "ours_cpu", 1, 0.2).speedup == pytest.approx(0.5)
    assert _by(results, "ours_cpu", 16, 0.1).speedup == pytest.approx(4.0)
    assert _by(results, "scipy", 1, 0.1).speedup == pytest.approx(0.25)
    assert _by(results, "ours_cpu", 1, 0.1).bytes_ratio == pytest.approx(3300 / 16384)
    assert _by(results, "ours_cpu", 16, 0.1).gflops == pytest.approx(2 * 0.1 * 64 * 64 * 16 / 2e-3 / 1e9, rel=1e-3)
    assert _by(results, "torch_dense", 1, 1.0).speedup == pytest.approx(1.0)


def test_speedups_follow_the_chosen_statistic():
    # min is half the median for every benchmark, so the ratios do not change; mean likewise
    for stat in ("min", "mean"):
        assert _by(kernel_results(synthetic(), stat), "ours_cpu", 1, 0.01).speedup == pytest.approx(4.0)
    with pytest.raises(ValueError, match="stat"):
        kernel_results(synthetic(), "p99")


def test_crossover_density_by_hand():
    # log-log interpolation between (0.1, 2) and (0.2, 0.5): t = ln2 / (ln2 + ln2) = 1/2,
    # density = exp((ln 0.1 + ln 0.2) / 2) = sqrt(0.02)
    c = crossover_density([(0.01, 4.0), (0.1, 2.0), (0.2, 0.5)])
    assert c.kind == "interpolated" and c.density == pytest.approx(math.sqrt(0.02))
    # exactly 1 at a point: crosses there
    assert crossover_density([(0.1, 1.0), (0.2, 0.5)]).density == pytest.approx(0.1)
    # unordered input, and a noisy win below a loss: the densest win counts
    c = crossover_density([(0.2, 0.8), (0.05, 3.0), (0.1, 0.9), (0.01, 9.0)])
    assert c.density == pytest.approx(math.exp(math.log(0.05) + math.log(3.0) / (math.log(3.0) - math.log(0.9))
                                               * (math.log(0.1) - math.log(0.05))))
    assert crossover_density([(0.1, 3.0), (0.5, 1.5)]) == Crossover(0.5, "at_or_above")
    assert crossover_density([(0.1, 0.3), (0.5, 0.1)]) == Crossover(None, "never")
    assert str(Crossover(0.5, "at_or_above")) == ">=50%" and str(Crossover(None, "never")) == "never"


def test_crossovers_per_series():
    cross = crossovers(kernel_results(synthetic()))
    assert cross[("64x64", "fp32", "cpu", 1, "ours_cpu/unstructured")].density == pytest.approx(math.sqrt(0.02))
    assert cross[("64x64", "fp32", "cpu", 16, "ours_cpu/unstructured")] == Crossover(0.2, "at_or_above")
    assert cross[("64x64", "fp32", "cpu", 1, "scipy/block16")] == Crossover(None, "never")
    assert not any(key[-1] == "torch_dense" for key in cross)  # the baseline is no series


def _rows(text):
    """Every markdown table row of ``text`` as a list of stripped cells."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def test_report_text_tables():
    rows = _rows(format_report(synthetic()))
    assert ["1", "ours_cpu/unstructured", "1 ms", "0.50x", "2.00x", "4.00x", "14.1%"] in rows
    assert ["16", "ours_cpu/unstructured", "8 ms", "2.00x", "4.00x", "8.00x", ">=20%"] in rows
    assert ["1", "scipy/block16", "1 ms", "0.20x", "0.25x", "-", "never"] in rows
    assert ["unstructured", "0.403", "0.201", "0.024"] in rows  # 6600 / 16384, 3300 / ..., 400 / ...
    assert ["mlp", "1", "cpu", "sparse-csr", "0.1000", "0.5 ms", "4.00x", "200", "0.200", "2"] in rows
    assert ["lenet300", "60", "cpu", "1 ms", "1.2 ms", "1.200", "1.150", "<= 1.3"] in rows


def test_old_json_falls_back_and_says_so():
    text = format_report(synthetic(), "min")
    assert "dense min / sparse min from separate benchmarks (older method, not interleaved)" in text
    assert "interleaved bursts (dense" not in text
    assert "dense time (min)" in text
    assert "latency (median)" in format_report(synthetic())  # the model records have medians only
    # the ISA comes from py-cpuinfo's flags in machine_info when extra_info has none
    assert "CPU: CPU (AVX2, 2 cores)" in text and "load not recorded" in text


# -- JSON with interleaved ratios ------------------------------------------------------------------
def test_interleaved_ratio_is_the_speedup():
    results = kernel_results(synthetic_interleaved())
    for (backend, N, density), ratio in INTERLEAVED.items():
        r = _by(results, backend, N, density)
        assert r.speedup == pytest.approx(ratio) and r.speedup_method == "interleaved"
        assert r.dense_seconds / r.seconds != pytest.approx(ratio)  # the fallback would differ
    # --stat changes plain times, never an interleaved ratio
    assert _by(kernel_results(synthetic_interleaved(), "min"), "ours_cpu", 1, 0.01).speedup == pytest.approx(2.0)


def test_crossovers_use_the_interleaved_ratio():
    cross = crossovers(kernel_results(synthetic_interleaved()))
    # N=1: 2.0 at 1%, exactly 1.0 at 10%, 0.25 at 20% -> crosses at 10% (fallback said sqrt(0.02))
    assert cross[("64x64", "fp32", "cpu", 1, "ours_cpu/unstructured")] == Crossover(pytest.approx(0.1), "interpolated")
    assert cross[("64x64", "fp32", "cpu", 16, "ours_cpu/unstructured")] == Crossover(0.2, "at_or_above")


def test_report_names_the_statistic_and_the_isa():
    text = format_report(synthetic_interleaved())
    rows = _rows(text)
    assert ["1", "ours_cpu/unstructured", "1 ms", "0.25x", "1.00x", "2.00x", "10%"] in rows
    assert ["16", "ours_cpu/unstructured", "8 ms", "1.00x", "2.00x", "4.00x", ">=20%"] in rows
    assert ["mlp", "1", "cpu", "sparse-csr", "0.1000", "0.5 ms", "3.00x", "200", "0.200", "2"] in rows
    assert "the median of interleaved bursts (dense and sparse alternated in one run)" in text
    assert "separate benchmarks" not in text.split("### Masked")[0]  # no fallback in the speed-up tables
    assert "CPU: AMD EPYC 9R14 (AVX-512, 2 cores); torch threads 2" in text
    assert "load average (1 min) as the benchmarks started: 0.50-2.50, median 1.50" in text
    assert "ratio (median of interleaved bursts)" in text
    assert "W 64x64 @ X [K, N], fp32, cpu: AMD EPYC 9R14, AVX-512, 2 threads" in text


def test_mixed_json_marks_the_fallback_cells():
    data = synthetic_interleaved()
    for bench in data["benchmarks"]:  # the scipy series from an older run
        if (bench.get("extra_info") or {}).get("backend") == "scipy":
            bench["extra_info"].pop("speedup_interleaved", None)
    text = format_report(data)
    assert ["1", "scipy/block16", "1 ms", "0.20x*", "0.25x*", "-", "never"] in _rows(text)
    assert "cells marked * are dense median / sparse median from separate benchmarks" in text


def test_plot_titles_name_the_statistic_and_the_isa(tmp_path, monkeypatch):
    titles = []
    original = matplotlib.figure.Figure.savefig

    def record(fig, *args, **kwargs):
        titles.append(fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title())
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    data = synthetic_interleaved()
    write_plots(kernel_results(data), tmp_path, machine_summary(data))
    speedup, _, crossover = titles
    for title in (speedup, crossover):
        assert "AMD EPYC 9R14, AVX-512" in title and "median of interleaved bursts" in title
    old = synthetic()
    titles.clear()
    write_plots(kernel_results(old, "min"), tmp_path, machine_summary(old), "min")
    assert "CPU, AVX2" in titles[0] and "dense min / min, separate runs" in titles[0]


def test_vector_isa_from_flags():
    assert vector_isa("fpu sse2 avx avx2 avx512f avx512bw".split()) == "AVX-512"
    assert vector_isa("fpu sse2 avx avx2 fma".split()) == "AVX2"
    assert vector_isa(["fp", "asimd"]) is None


def test_gzipped_json_reads_the_same(tmp_path):
    plain, packed = tmp_path / "b.json", tmp_path / "b.json.gz"
    plain.write_text(json.dumps(synthetic()))
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert make_report(packed)[0] == make_report(plain)[0]


def test_report_rejects_what_is_not_benchmark_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="pytest-benchmark"):
        make_report(bad)
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "missing.json")


def test_cli_report_writes_plots(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(synthetic()))
    out = tmp_path / "plots"
    assert main(["report", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Speed-up over dense" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bytes_64x64_fp32_cpu.png", "crossover_64x64_fp32_cpu.png", "speedup_64x64_fp32_cpu.png"]
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert main(["report", str(tmp_path / "nope.json")]) == 2
