"""`python -m compress_export ARGS` is the `compress-export` command, so that
`torchrun --nproc-per-node N -m compress_export ARGS` runs the same CLI in every rank."""
import sys

from .cli import main

sys.exit(main())
