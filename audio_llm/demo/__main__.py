"""`python -m audio_llm.demo`: the embedded demo (see `audio_llm.demo.run`)."""

import sys

from audio_llm.demo.run import main

sys.exit(main())
