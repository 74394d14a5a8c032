import sys

from conversion.megatron.cli import main

sys.exit(main())
