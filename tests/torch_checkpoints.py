"""Tiny random PyTorch checkpoints of every convertible component, and helpers the converter tests share.

The architectures are small enough to build in a test; every parameter is moved off its init (`perturb`) so a
wrong key mapping cannot hide behind zeros and ones.
"""

import json
import os

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, ZImageTransformer2DModel
from transformers import InternVLForConditionalGeneration

from iomm_jax.convert import cli
from iomm_jax.convert.torch_rqa import TorchRQA
from iomm_jax.models.processor import Processor
from iomm_jax.weights import io

FLUX = dict(
    in_channels=8,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=12,
    axes_dims_rope=(2, 2, 4),
)
ZIMAGE = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=4,
    dim=32,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    qk_norm=True,
    cap_feat_dim=16,
    axes_dims=[4, 6, 6],
    axes_lens=[64, 16, 16],
)
VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    scaling_factor=0.5,
    shift_factor=0.25,
    sample_size=16,
)
RQA = dict(dim=16, num_queries=4, num_heads=2, mlp_ratio=2.0, num_layers=1, eps=1e-6)
MLLM = dict(
    vision_config=dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=7
    ),
    text_config=dict(
        model_type="qwen2",
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    image_token_id=Processor.tiny().image_token_id,  # the tokenizer copied beside the weights: one model
    image_seq_length=4,
)


def perturb(model, scale=0.1):
  """Move every parameter (norm weights, zero biases) off its init so a wrong mapping cannot hide."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model


def write_rqa(path, extra=None, drop=None):
  """The RQA reference layout (config.json + model.safetensors), optionally with an extra / missing key."""
  torch.manual_seed(3)
  ref = perturb(TorchRQA(**RQA))
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  sd.update(extra or {})
  for k in drop or ():
    sd.pop(k)
  io.write_safetensors(sd, path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"_class_name": "TorchRQA", **RQA}, f)
  return ref


def run_cli(*argv):
  """`python -m iomm_jax.convert ARGV` in process; returns its exit status."""
  return cli.main([str(a) for a in argv])


def load_reference(kind, path):
  """Load an exported folder with the PyTorch library; asserts nothing was missing or unexpected."""
  if kind == "mmdit":
    model, info = FluxTransformer2DModel.from_pretrained(path, output_loading_info=True)
  elif kind == "s3dit_bf16":
    model, info = ZImageTransformer2DModel.from_pretrained(path, output_loading_info=True)
  elif kind == "vae_file":
    model, info = AutoencoderKL.from_pretrained(path, output_loading_info=True)
  elif kind.startswith("rqa"):
    cfg = json.load(open(os.path.join(path, "config.json")))
    model = TorchRQA(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    sd = {k: torch.from_numpy(v.copy()) for k, v in io.read_state_dict(path).items()}
    model.load_state_dict(sd, strict=True)
    return model
  else:
    model, info = InternVLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return model
