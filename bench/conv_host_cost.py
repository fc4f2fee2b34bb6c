#!/usr/bin/env python
"""The host's share of a block-sparse Triton conv call, with the kernel stubbed out. At batch 1
a GPU conv is bound by the host (on an H200 cuDNN took 31-48 us a call and the Triton conv
42-74 us, for kernels of a few microseconds), so what the Python around the launch costs
decides there; a CPU can measure it before a GPU does.

A 3x3 conv, 256 channels, 14x14, batch 1, 32 x 32 blocks at 10 %, one thread; three calls
timed interleaved (medians of 15 bursts of 300 calls):

* ``public``: ``triton_bsr_conv2d`` on a channels-last input: every check, every call;
* ``layer``: ``SparseConv2d``'s Triton path on the same input: its launch prepared once per
  input signature (``prepare_bsr_conv2d``);
* ``empty``: the output's ``torch.empty``, the floor of any call.

The stubbed launch returns at once (a real one costs 15-30 us on an H200, bench/launch_cost.py).

    python bench/conv_host_cost.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path accepts CPU tensors

import torch  # noqa: E402

from harness import interleaved  # noqa: E402  (bench/ is on the path when run as a script)
from sparse_lth.kernels import conv  # noqa: E402
from sparse_lth.nn.conv import SparseConv2d  # noqa: E402

CHANNELS, SIZE = 256, 14


class _Stub:
    """Stands in for the jitted kernel: ``kernel[grid](...)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = torch.nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
    tiles = torch.rand(CHANNELS // 32, CHANNELS // 32, 3, 3) < 0.1
    mask = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
    layer = SparseConv2d.from_conv(dense, mask=mask, backend="sparse")
    crow, col, values = conv.conv_weight_to_bsr(dense.weight.detach(), mask, (32, 32))
    x = torch.randn(1, CHANNELS, SIZE, SIZE).to(memory_format=torch.channels_last)
    conv._bsr_conv2d_kernel = _Stub()
    cache = layer._cache()
    fns = {
        "public": lambda: conv.triton_bsr_conv2d(x, crow, col, values, dense.bias, out_channels=CHANNELS,
                                                 kernel_size=(3, 3), padding=(1, 1)),
        "layer": lambda: layer._triton(x, cache),
        "empty": lambda: torch.empty((1, CHANNELS, SIZE, SIZE)),
    }
    with torch.no_grad():
        for fn in fns.values():
            fn()
        seconds = interleaved(fns, "cpu", 15, dict.fromkeys(fns, 300)).seconds
    for name, s in seconds.items():
        print(f"{name:<7} {s * 1e6:6.1f} us a call")


if __name__ == "__main__":
    main()
