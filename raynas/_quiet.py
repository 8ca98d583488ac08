"""Quiet third-party import noise before transformers is imported (``import raynas`` imports this first).

transformers imports torchao whenever it is installed; on a CPU machine torchao then
logs that its CUDA-only kernels cannot load, and torch logs notes on torchao's enum
registration -- four lines on every command, none of them news. Warnings and errors
from those loggers after import are unaffected at ERROR level.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
