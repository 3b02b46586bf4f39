"""`python -m glm41v_jax.cli ...`: the same as the `glm41v` command."""

import sys

from . import main

sys.exit(main())
