"""``python -m tether`` (and ``torchrun ... -m tether <stage>``): the same command as ``tether``."""

from tether.cli import main

main()
