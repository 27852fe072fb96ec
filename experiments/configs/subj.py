"""Config of the subj comparison (PROTOCOL.md §1-§9).

Command: ``python -m experiments.compare --task subj`` (SmolLM2-135M-Instruct Q4_1 by default); the
results of the default model are in docs/results.md.
"""

from experiments.configs import base


def get_config():
  return base.get_config("subj")
