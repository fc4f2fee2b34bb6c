"""``python -m sparse_lth ...``: the ``sparse-lth`` command, so that ``torchrun -m sparse_lth`` works.

    torchrun --standalone --nproc_per_node 2 -m sparse_lth search --dataset digits --rounds 2
"""

from sparse_lth.cli import console_main

console_main()
