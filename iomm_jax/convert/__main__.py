"""python -m iomm_jax.convert {to-jax,to-torch,verify} ... (see iomm_jax/convert/cli.py)."""

import sys

from iomm_jax import app_exit
from iomm_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(app_exit.run(main))
