"""train/flops.py: the analytic FLOPs of the training step against XLA's cost_analysis() of the compiled tiny step,
the components it counts (ViT on its patches, the LLM on its own sequence, remat recompute apart), and the MM-DiT's
and RQA's forward formulas term by term against the dot products of their traced forwards."""

import math

import jax
import jax.numpy as jnp
import pytest

from helpers import tiny_config, with_tiny_s3dit
from iomm_jax import parallel
from iomm_jax.train import builder, dry_run, flops


def _run(c, devices=1):
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = devices, 1, 1
  return builder.build(c, mesh=parallel.make_mesh(c.mesh, devices=jax.devices()[:devices]), load_frozen=False)


@pytest.mark.slow
@pytest.mark.parametrize("repa_weight", [0.0, 0.5])
def test_analytic_flops_match_xla_cost_analysis_of_the_tiny_step(repa_weight):
  """Within 15%: XLA also counts every elementwise op (norms, GELU/SiLU, softmax, RoPE, the loss, AdamW and EMA
  updates, 1 FLOP per element each), which the analytic matmul + attention count leaves out, so XLA's figure is
  the higher one (measured: analytic / XLA = 0.92 on the tiny step, with or without the REPA head)."""
  run = _run(tiny_config(train__repa_weight=repa_weight))
  counted = flops.step_flops(run)
  state = dry_run.abstract_with_shardings(run.abstract_state, run.state_shardings)
  compiled = run.train_step.lower(state, dry_run.abstract_frozen(run), dry_run.abstract_batch(run)).compile()
  cost = compiled.cost_analysis()
  xla = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  assert counted["hardware"] == counted["model"]  # tiny: no remat
  assert 0.85 * xla <= counted["model"] <= 1.0 * xla, (counted["model"], xla)


def test_components_scale_with_their_own_sequences():
  c = tiny_config()
  base = flops.step_flops(_run(c))
  # The ViT runs on its own patches only: doubling the LLM's depth leaves it alone, and vice versa.
  c2 = tiny_config()
  c2.model.mllm.arch.text["num_hidden_layers"] *= 2
  deeper = flops.step_flops(_run(c2))
  assert deeper["per_image"]["vit"] == base["per_image"]["vit"]
  assert deeper["per_image"]["llm"]["forward"] == pytest.approx(2 * base["per_image"]["llm"]["forward"])
  assert deeper["per_image"]["dit"] == base["per_image"]["dit"]
  # Remat re-runs the LLM forward: reported apart, not in the MFU numerator.
  c3 = tiny_config()
  c3.model.mllm.remat = "full"
  remat = flops.step_flops(_run(c3))
  assert remat["model"] == base["model"]
  assert remat["remat"] == pytest.approx(c3.train.global_batch * base["per_image"]["llm"]["forward"])
  # Cached features: no ViT in the step.
  c4 = tiny_config()
  c4.data.cached, c4.data.cache_path = True, "unused"
  assert "vit" not in flops.step_flops(_run(c4))["per_image"]
  # REPA: its head on the DiT's image tokens (8×8 here: width 64 → 128 → 128 → the LLM's 64), trained; off by default.
  assert "repa" not in base["per_image"]
  c5 = tiny_config(train__repa_weight=0.5)
  head = flops.step_flops(_run(c5))["per_image"]["repa"]
  assert head == {"forward": 2.0 * 64 * (64 * 128 + 128 * 128 + 128 * 64), "backward": 2 * head["forward"]}
  # The pair recipe skips the ViT, unless REPA needs the image's MLLM tokens.
  assert flops.step_flops(_run(tiny_config("finetune_pair")))["per_image"]["vit"]["forward"] == 0.0
  paired = flops.step_flops(_run(tiny_config("finetune_pair", train__repa_weight=0.5)))["per_image"]["vit"]
  assert paired["forward"] == base["per_image"]["vit"]["forward"]
  # Trainable parts: backward twice the forward; the frozen LLM's weights get no gradient.
  dit, llm = base["per_image"]["dit"], base["per_image"]["llm"]
  assert dit["backward"] == 2 * dit["forward"]
  assert llm["forward"] < llm["backward"] < 2 * llm["forward"]


def test_every_dit_family_has_a_flops_formula():
  from iomm_jax.models import dit_families

  assert set(flops.DIT_FORWARD) == set(dit_families.DIT_FAMILIES)


def test_image_tokens_follow_the_dit_familys_patch():
  """Tokens per image are the latent grid over the family's own patch (S3-DiT's may be 4×4), not a fixed 2×2: the
  MFU numerator and tokens_per_s_per_device both read them."""
  flux = _run(tiny_config())
  h, w = flux.latent_shape[:2]
  assert flops.image_tokens(flux) == (h // 2) * (w // 2)
  z2, z4 = with_tiny_s3dit(tiny_config()), with_tiny_s3dit(tiny_config())
  z4.model.dit.arch["all_patch_size"] = (4,)
  runs = {p: _run(c) for p, c in ((2, z2), (4, z4))}
  assert {p: flops.image_tokens(r) for p, r in runs.items()} == {2: (h // 2) * (w // 2), 4: (h // 4) * (w // 4)}
  per_image = {p: flops.step_flops(r)["per_image"]["dit"]["forward"] for p, r in runs.items()}
  assert per_image[4] < per_image[2] / 2  # a quarter of the tokens (attention falls faster, the embedders less)


def _dot_flops(jaxpr) -> float:
  """2·M·N·K of every dot_general in a jaxpr, its sub-jaxprs included (a scan's body times its length): the matmuls
  and attention products the traced program runs, counted independently of flops.py's formulas."""
  total = 0.0
  for eqn in jaxpr.eqns:
    assert eqn.primitive.name != "while", "a while loop's trip count is unknown: count it another way"
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr → Jaxpr
        if hasattr(inner, "eqns"):
          total += times * _dot_flops(inner)
  return total


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _check_forward(counted: float, fn, *args):
  """counted == the traced forward's dot FLOPs exactly, and within 10% of XLA's cost_analysis() of it compiled.

  The exact count is the test: a dropped or miscounted term shows however small it is. XLA's figure differs by design
  (measured −6% to +2% here: it adds 1 FLOP per element of every norm, activation, softmax and RoPE op, and it may
  drop dead code, e.g. the last block's unused context output); it only guards the jaxpr count against missing what
  the compiled program runs."""
  dots = _dot_flops(jax.make_jaxpr(fn)(*args).jaxpr)
  assert counted == pytest.approx(dots, rel=1e-9), (counted, dots)
  xla = _xla_flops(fn, *args)
  assert 0.9 * xla <= dots <= 1.1 * xla, (dots, xla)


# Width 64 (4 heads of 16) over 256 image + 64 condition tokens (S = 320): attention (4·S²·d) is ~45% of a block's
# FLOPs and the single block's MLP-out (2·S·4d·d) ~18%; the RQA's cross-attention (4·Q·L·d) is 16% of its forward at
# Q = 16, L = 256. The whole-step check above tolerates 15% and cannot see any of them go missing.
WIDTH, IMAGE_SIDE, COND = 64, 16, 64


@pytest.mark.parametrize("double, single", [(1, 0), (0, 1), (2, 1)])
def test_mmdit_forward_counts_every_matmul_and_attention_product(double, single):
  """flops.mmdit_forward equals the dot FLOPs of the MM-DiT's own forward, double and single blocks each alone:
  pins the double block's attention and q/k/v/out/MLP terms and the single block's fused q/k/v+MLP-in and
  (attention + MLP)-out projections."""
  from flax import nnx

  from iomm_jax.models import latents
  from iomm_jax.models.mmdit import MMDiT, MMDiTConfig

  cfg = MMDiTConfig(
      in_channels=48, num_layers=double, num_single_layers=single, attention_head_dim=16, num_attention_heads=4,
      joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH, axes_dims_rope=(4, 6, 6), zero_init=False,
  )  # fmt: skip
  graphdef, state = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(0)))
  n = IMAGE_SIDE**2
  img_ids, txt_ids = latents.image_ids(IMAGE_SIDE, IMAGE_SIDE), latents.text_ids(COND)

  def forward(state, x, h, pooled, t):
    return nnx.merge(graphdef, state)(x, h, pooled, t, img_ids, txt_ids)

  args = (state, jnp.ones((1, n, 48)), jnp.ones((1, COND, WIDTH)), jnp.ones((1, WIDTH)), jnp.full((1,), 0.5))
  _check_forward(flops.mmdit_forward(cfg, n, COND), forward, *args)


@pytest.mark.parametrize("queries, context", [(16, 256), (64, 128)])
def test_rqa_forward_counts_its_cross_attention(queries, context):
  """flops.rqa_forward equals the dot FLOPs of the RQA's forward: query/key/value/out projections, the Q × L
  cross-attention products and the query MLP."""
  from flax import nnx

  from iomm_jax.models.rqa import RQA, RQAConfig

  cfg = RQAConfig(dim=WIDTH, num_queries=queries, num_heads=4)
  graphdef, state = nnx.split(RQA(cfg, rngs=nnx.Rngs(0)))

  def forward(state, c):
    return nnx.merge(graphdef, state)(c)

  _check_forward(flops.rqa_forward(cfg, context), forward, state, jnp.ones((1, context, WIDTH)))
