"""The on-disk record formats of our ArrayRecord shards (msgpack, versioned).

Two kinds of record share one encoding, a msgpack map with ``kind`` and ``v`` (format version):

* ``kind='image'`` — written by ``data.prepare``: ``image_bytes`` (the encoded file, unchanged), ``caption``
  (str or None), ``width``, ``height`` and ``id`` (sha1 of the source path/key).
* ``kind='features'`` — written by the feature cache (``iomm_jax.cache``): ``id``, ``vit_tokens`` (N, D) float16/32,
  ``latent`` (H, W, C) float16/32, ``caption_ids`` (T,) int32 or None, ``caption`` (str or None) and optional extra
  arrays. Training with ``data.cached=True`` reads these and never runs the ViT or the VAE encoder.

numpy arrays travel as ``{'__nd__': 1, 'dtype', 'shape', 'data'}`` maps (raw little-endian bytes), so decoding is
a zero-copy ``np.frombuffer`` per array.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

FORMAT_VERSION = 1
_ND = "__nd__"


def _pack_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj)
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("<"))
    return {_ND: 1, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(
      f"records: cannot encode a value of type {type(obj).__name__}; use numpy arrays, str, " "bytes, numbers or None"
  )


def _unpack_hook(obj: dict) -> Any:
  if obj.get(_ND) == 1:
    return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
  return obj


def _encode(kind: str, fields: dict[str, Any]) -> bytes:
  return msgpack.packb({"kind": kind, "v": FORMAT_VERSION, **fields}, default=_pack_default, use_bin_type=True)


def encode_image_record(*, image_bytes: bytes, caption: str | None, width: int, height: int, id: str) -> bytes:
  """Serialises one ingested image (encoded bytes kept as they are) for an ArrayRecord shard."""
  return _encode(
      "image",
      {
          "image_bytes": bytes(image_bytes),
          "caption": caption,
          "width": int(width),
          "height": int(height),
          "id": str(id),
      },
  )


def encode_feature_record(
    *,
    id: str,
    vit_tokens: np.ndarray,
    latent: np.ndarray,
    caption_ids: np.ndarray | None = None,
    caption: str | None = None,
    **extra: np.ndarray,
) -> bytes:
  """Serialises one cached-feature record (ViT tokens, VAE latent, caption token ids)."""
  fields = {
      "id": str(id),
      "vit_tokens": np.asarray(vit_tokens),
      "latent": np.asarray(latent),
      "caption_ids": None if caption_ids is None else np.asarray(caption_ids, np.int32),
      "caption": caption,
  }
  for k, v in extra.items():
    if k in fields:
      raise ValueError(f"encode_feature_record: extra field {k!r} clashes with a standard field")
    fields[k] = np.asarray(v)
  return _encode("features", fields)


def decode_record(data: bytes) -> dict[str, Any]:
  """Parses a record written by either encoder; raises ValueError for anything else."""
  try:
    rec = msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise ValueError(f"not an iomm_jax record ({type(e).__name__}: {e})") from e
  if not isinstance(rec, dict) or rec.get("kind") not in ("image", "features"):
    raise ValueError(
        "not an iomm_jax record (missing 'kind'); was the shard written by iomm_jax.data.prepare " "or iomm_jax.cache?"
    )
  if rec.get("v", 0) > FORMAT_VERSION:
    raise ValueError(f"record format v{rec['v']} is newer than this code (v{FORMAT_VERSION}); update iomm_jax")
  return rec
