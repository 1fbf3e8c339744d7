"""``python -m lrponnx``: the command line."""
import sys

from lrponnx.app.cli import main

sys.exit(main())
