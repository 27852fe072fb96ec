r"""Seconds per function of a ``py-spy record -f raw`` profile, inclusive, main thread only.

``bash benchmarks/gpu_compare.sh`` with ``WRAP_WARM="py-spy record -r 100 --idle -f raw -o FILE --"``
writes such a profile of its warm pass; this prints the functions (``name (file)``, line numbers dropped)
whose name matches ``--match``, largest first, counting each sample once per function on its stack.

Command: ``python -m benchmarks.pyspy_summary --profile FILE --rate 100 --match "dualform|experiments"``.
"""

from __future__ import annotations

import collections
import re

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("profile", None, "raw py-spy output (one 'frame;frame;... count' line per stack)", required=True)
flags.DEFINE_float("rate", 100.0, "samples per second of the recording (py-spy -r)")
flags.DEFINE_string("match", "", "regular expression a listed function must match (empty: all)")
flags.DEFINE_integer("top", 60, "rows to print")


def main(argv):
  del argv
  inclusive, main_samples = collections.Counter(), 0
  with open(FLAGS.profile) as handle:
    for line in handle:
      stack, _, count = line.rstrip().rpartition(" ")
      frames = [re.sub(r":\d+\)", ")", frame) for frame in stack.split(";")]
      if not frames[0].startswith("_run_module_as_main"):  # other threads
        continue
      main_samples += int(count)
      for frame in set(frames):
        inclusive[frame] += int(count)
  print(f"main thread: {main_samples / FLAGS.rate:.1f} s")
  rows = [(frame, n) for frame, n in inclusive.most_common() if re.search(FLAGS.match, frame)]
  for frame, n in rows[:FLAGS.top]:
    print(f"{n / FLAGS.rate:8.2f} s  {frame}")


if __name__ == "__main__":
  app.run(main)
