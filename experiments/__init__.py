"""Entry points: thin absl CLIs over the importable dualform modules (python -m experiments.<name>)."""
