"""Stage 1: train the projector with the encoder and LLM frozen.

deepspeed --num_gpus 8 launch/stage1.py --config run.yaml [section.key=value ...]
"""

import sys

from audio_llm.cli.stage import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(1))
