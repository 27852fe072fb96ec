"""Plots of one comparison run folder, drawn only from its files (matplotlib, Agg backend).

``python -m experiments.plot <run folder>`` (or :func:`plot_run`) writes into the folder:

* ``simaou.png``: per-layer SimAOU against its random baseline (and the shuffled-pairing control);
* ``simam.png``: per-layer SimAM against ZSL-SimAM, with SimAM_Δ;
* ``accuracy.png``: accuracy per setting (mean ± std over runs).

``python -m experiments.plot --table <run folder>...`` prints one markdown row per run folder (the table of
docs/results.md).

Public names: :func:`plot_run`, :func:`table_markdown`, :func:`main`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



def _per_layer(results: dict, comparison: str, path: tuple[str, ...]) -> np.ndarray | None:
  """[runs, L] of one per-layer metric at the configured position, or None when absent."""
  rows = []
  for record in results["runs"]:
    block = record.get("metrics", {}).get(comparison, {}).get(results["position"])
    for key in path:
      block = None if block is None else block.get(key)
    if block is None:
      return None
    rows.append(block["per_layer"])
  return np.asarray(rows, np.float64)


def _line(axis, values: np.ndarray | None, label: str, **style) -> None:
  if values is None:
    return
  layers = np.arange(values.shape[1])
  mean = values.mean(axis=0)
  axis.plot(layers, mean, label=label, **style)
  if values.shape[0] > 1:
    std = values.std(axis=0, ddof=1)
    axis.fill_between(layers, mean - std, mean + std, alpha=0.2, color=axis.lines[-1].get_color())


def _save(figure, path: pathlib.Path) -> None:
  """Saves atomically (temporary file + os.replace)."""
  temporary = path.with_name(f".{path.name}.tmp")
  figure.savefig(temporary, dpi=110, bbox_inches="tight", format="png")
  plt.close(figure)
  os.replace(temporary, path)


def plot_run(folder: str | os.PathLike) -> list[pathlib.Path]:
  """Draws the plots of a run folder from its ``results.json``; returns the written paths."""
  folder = pathlib.Path(folder)
  results = json.loads((folder / "results.json").read_text())
  title = f"{results['task']} / {results['model']} @ {results['position']}"
  written = []
  comparisons = [name for name in ("icl_vs_ft", "icl_vs_ft_lcgd", "icl_vs_icl_perm")
                 if _per_layer(results, name, ("simaou",)) is not None]
  if comparisons:
    figure, axis = plt.subplots(figsize=(7, 4))
    for comparison in comparisons:
      _line(axis, _per_layer(results, comparison, ("simaou",)), f"SimAOU {comparison}")
      _line(axis, _per_layer(results, comparison, ("shuffled", "simaou")), f"shuffled {comparison}", linestyle=":")
    _line(axis, _per_layer(results, comparisons[0], ("random_simaou",)), "random", color="gray", linestyle="--")
    axis.axhline(0.0, color="black", linewidth=0.5)
    axis.set(xlabel="layer", ylabel="SimAOU", title=title)
    axis.legend(fontsize=8)
    _save(figure, folder / "simaou.png")
    written.append(folder / "simaou.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    for comparison in comparisons:
      _line(axis, _per_layer(results, comparison, ("simam",)), f"SimAM {comparison}")
      _line(axis, _per_layer(results, comparison, ("simam_delta",)), f"SimAM_Δ {comparison}", linestyle="-.")
    _line(axis, _per_layer(results, comparisons[0], ("zsl_simam",)), "ZSL-SimAM", color="gray", linestyle="--")
    axis.set(xlabel="layer", ylabel="cosine of pre-softmax scores", title=title)
    axis.legend(fontsize=8)
    _save(figure, folder / "simam.png")
    written.append(folder / "simam.png")

  settings = results["settings"]
  means = [results["aggregate"][f"accuracy/{name}"]["mean"] for name in settings]
  stds = [results["aggregate"][f"accuracy/{name}"]["std"] for name in settings]
  stds = [0.0 if std is None or not np.isfinite(std) else std for std in stds]
  figure, axis = plt.subplots(figsize=(1.2 * len(settings) + 2, 4))
  axis.bar(settings, means, yerr=stds, color="tab:blue", capsize=4)
  for index, mean in enumerate(means):
    axis.text(index, mean + 1, f"{mean:.1f}", ha="center", fontsize=8)
  axis.set(ylabel="accuracy (%)", ylim=(0, 105), title=title)
  _save(figure, folder / "accuracy.png")
  written.append(folder / "accuracy.png")
  return written


def _cell(aggregate: dict, name: str, digits: int) -> str:
  entry = aggregate.get(name)
  if not entry or entry.get("mean") is None or not np.isfinite(entry["mean"]):
    return "n/a"
  text = f"{entry['mean']:.{digits}f}"
  if entry.get("n", 1) > 1 and entry.get("std") is not None and np.isfinite(entry["std"]):
    text += f" ± {entry['std']:.{digits}f}"
  return text


def table_markdown(folders: list[str | os.PathLike]) -> str:
  """One row per run folder: N, k_eff, LR, accuracy ZSL/FT/ICL, Rec2FTP (counts), chance Rec2FTP, SimAOU vs
  random and shuffled pairing, SimAM vs ZSL-SimAM, SimAM_Δ, Kendall (token: vs random and shuffled; example:
  vs random), wall time; from results.json."""
  header = ("| task | N | k_eff | FT lr | ZSL | FT | ICL | Rec2FTP (n/d) | chance | SimAOU | random | shuffled | "
            "SimAM | ZSL-SimAM | SimAM_Δ | Kendall tok | random | shuffled | Kendall ex | random | wall s |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for folder in folders:
    results = json.loads((pathlib.Path(folder) / "results.json").read_text())
    aggregate, run = results["aggregate"], results["runs"][0]
    rec = run.get("correctness", {}).get("icl_vs_ft", {}).get("rec2ftp", {})
    cells = [results["task"], str(results["num_examples"]), str(run["k_eff"]),
             f"{run['learning_rate']['value']:g}" if run["learning_rate"].get("value") else "n/a"]
    cells += [_cell(aggregate, f"accuracy/{name}", 1) for name in ("zsl", "ft", "icl")]
    cells.append(f"{_cell(aggregate, 'icl_vs_ft/rec2ftp', 1)} ({rec.get('numerator')}/{rec.get('denominator')})")
    cells.append(_cell(aggregate, "icl_vs_ft/chance_rec2ftp", 1))
    cells += [_cell(aggregate, f"icl_vs_ft/{name}", 3) for name in
              ("simaou", "random_simaou", "shuffled/simaou", "simam", "zsl_simam", "simam_delta", "kendall_token",
               "random_kendall_token", "shuffled/kendall_token", "kendall_example", "random_kendall_example")]
    cells.append(f"{results['timings']['wall_seconds']:.0f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  if len(argv) >= 3 and argv[1] == "--table":
    print(table_markdown(argv[2:]), end="")
    return 0
  if len(argv) != 2:
    print("usage: python -m experiments.plot <run folder> | --table <run folder>...", file=sys.stderr)
    return 2
  try:
    for path in plot_run(argv[1]):
      print(path)
  except (OSError, KeyError, ValueError) as error:
    print(f"error: cannot plot {argv[1]}: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
