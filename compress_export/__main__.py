"""`python -m compress_export ARGS` is the `compress-export` command, so that
`torchrun --nproc-per-node N -m compress_export ARGS` runs the same CLI in every rank."""

import sys

from compress_export.cli.main import main

sys.exit(main())
