"""weights/io reads PyTorch pickles (.pt / .bin) tensor for tensor: dtypes and values as torch holds them."""

import ml_dtypes
import numpy as np
import torch

from iomm_jax.weights import io


def test_a_torch_pickle_reads_bf16_and_fp32_tensors_exactly(tmp_path):
  """bfloat16 has no numpy dtype of its own in torch: its bits must be read as ml_dtypes.bfloat16 (read as float16
  they would be other numbers), and values past float16's range survive."""
  values = [1.5, -2.25, 3.0e-3, 1.0e5, -7.0e-20]
  sd = {"a.weight": torch.tensor(values, dtype=torch.bfloat16), "b.bias": torch.arange(6, dtype=torch.float32)}
  torch.save({"state_dict": sd}, tmp_path / "m.pt")  # a training script's wrapper, as Lightning writes it
  got = io.read_state_dict(tmp_path / "m.pt")
  assert sorted(got) == ["a.weight", "b.bias"]
  assert got["a.weight"].dtype == np.dtype(ml_dtypes.bfloat16) and got["b.bias"].dtype == np.float32
  np.testing.assert_array_equal(got["a.weight"].astype(np.float32), sd["a.weight"].float().numpy())
  np.testing.assert_array_equal(got["b.bias"], np.arange(6, dtype=np.float32))
