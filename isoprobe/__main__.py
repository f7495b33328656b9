"""``python -m isoprobe``: the ``isoprobe`` command line (also under ``torchrun ... -m isoprobe``)."""

from isoprobe.cli import main

main()
