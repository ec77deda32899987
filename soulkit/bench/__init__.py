"""Microbenchmarks that ship with the package: ``soulkit bench kernels``.

- :mod:`.kernels`: the Sophia, AdaHessian and projection kernels against their references and torch
  baselines (effective bandwidth, % of the measured copy bandwidth, ratios with their IQR).
- :mod:`.timing`: arms timed in alternating rounds from a cold cache, ratios as paired medians.
- :mod:`.machine`: the machine record every result carries.
"""
