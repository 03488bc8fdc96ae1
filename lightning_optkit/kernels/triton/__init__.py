"""Hand-written Triton multi-tensor kernels: one launch per (device, dtype) group of tensors.

Importing this package needs ``triton``; :mod:`lightning_optkit.kernels.dispatch` decides whether it runs.
"""
