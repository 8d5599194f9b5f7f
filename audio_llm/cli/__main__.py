"""`python -m audio_llm.cli` (as torchrun and deepspeed launch it): the `audio-llm` command."""

import sys

from audio_llm.cli import main

sys.exit(main())
