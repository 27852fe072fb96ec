"""Config of the sst5 comparison (PROTOCOL.md §1-§9).

Command: ``python -m experiments.compare --task sst5`` (SmolLM2-135M-Instruct Q4_1 by default); the
results of the default model are in docs/results.md.
"""

from experiments.configs import base


def get_config():
  return base.get_config("sst5")
