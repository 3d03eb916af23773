"""`--dry_run` (train/dry_run.py): per-device state bytes from the shardings, XLA's memory analysis of the compiled
step, and the analytic FLOPs, without allocating the model."""

import jax
import pytest

from helpers import load_config, tiny_config
from iomm_jax import parallel
from iomm_jax.train import dry_run

GB = dry_run.GB


@pytest.mark.slow
def test_tiny_dry_run_compiles_on_an_fsdp_mesh_and_reports_memory():
  c = tiny_config()
  c.model.dit.arch.num_layers = c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch.text["num_hidden_layers"] = c.model.mllm.arch.vision["num_hidden_layers"] = 1
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  mesh = parallel.make_mesh(c.mesh, devices=jax.devices()[:8])
  out = dry_run.report(c, mesh=mesh)
  assert out["devices"] == 8 and out["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert out["per_device_batch"] == c.train.global_batch / 8
  assert set(out["per_device_gb"]) == {"params", "optimizer", "ema", "frozen_mllm", "frozen_ae", "batch"}
  assert out["xla_gb"]["temp"] > 0 and out["peak_gb_estimate"] >= out["xla_gb"]["argument"]
  # The analytic count against XLA's own count of the compiled program (per device, every op): the analytic one
  # leaves out norms, activations, softmax and the optimizer, so it is a little lower (test_flops.py has the
  # 1-device comparison of the full tiny step).
  ratio = out["flops_per_step_per_device"] / out["xla_flops_per_device"]
  assert 0.7 < ratio < 1.05, ratio
  assert "xla_flops_note" not in out  # nothing scanned: XLA counted every block
  assert set(out["flops"]["per_image"]) == {"dit", "rqa", "llm", "vit"}
  assert out["compile_s"] > 0


@pytest.mark.slow
def test_full_size_state_bytes_per_device_without_compiling():
  """IOMM-B widths on fsdp = 8, abstract only (one block per stack to keep it quick): the per-device bytes of the
  fp32 params, AdamW state and EMA are 1/8 of their totals, since every large leaf divides by 8."""
  c = load_config("iomm_b", "cached")
  c.data.cache_path = "unused"
  c.train.global_batch = 8
  c.model.dit.arch.num_layers = c.model.dit.arch.num_single_layers = 1
  c.model.mllm.arch = {"text": {"num_hidden_layers": 1}, "vision": {"num_hidden_layers": 1}}
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  out = dry_run.report(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:8]), compile_step=False)
  assert out["params"]["rqa"] == 28_718_592
  trainable_gb = (out["params"]["dit"] + out["params"]["rqa"]) * 4 / GB
  assert trainable_gb > 0.5
  assert out["per_device_gb"]["params"] == pytest.approx(trainable_gb / 8, rel=0.01)
  assert out["per_device_gb"]["optimizer"] == pytest.approx(2 * trainable_gb / 8, rel=0.01)  # AdamW mu and nu
  assert out["per_device_gb"]["ema"] == out["per_device_gb"]["params"]
  assert out["flops_per_step"] > 0 and "xla_gb" not in out
