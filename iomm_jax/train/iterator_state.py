"""The saved data-iterator state of a run resumed with another number of processes."""

from __future__ import annotations

import json
import os
import re


def from_other_process_count(data_dir: str, new_count: int) -> dict:
  """The data-iterator state for `new_count` processes from one written by another process count.

  Each process reads a contiguous block of every global batch (data/pipeline.py ProcessBlocks) and Grain's
  position counts *batches*, so after N steps every process, whatever the count, is at position N: the state of
  process 0 is valid for all processes of the new layout.
  """
  names = [n for n in os.listdir(data_dir) if re.fullmatch(r"process_\d+-of-\d+\.json", n)]
  if not names:
    raise FileNotFoundError(f"{data_dir} holds no data-iterator state")
  old_count = int(re.fullmatch(r"process_\d+-of-(\d+)\.json", names[0]).group(1))
  with open(os.path.join(data_dir, f"process_0-of-{old_count}.json")) as f:
    state = json.load(f)
  if set(state) != {"next_index"}:
    raise ValueError(
        f"cannot move the data iterator state in {data_dir} from {old_count} to {new_count} processes: "
        f"it is not a plain batch position ({sorted(state)}); resume with {old_count} processes or "
        "config.data.num_workers=0"
    )
  return {"next_index": int(state["next_index"])}
