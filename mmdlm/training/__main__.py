"""``python -m mmdlm.training RECIPE.yaml ...`` (also under ``accelerate launch -m`` and ``torchrun -m``)."""

import sys

from . import main

sys.exit(main())
