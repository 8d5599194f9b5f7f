"""Stage 2: projector (initialised from stage 1) + regex-targeted LoRA on the LLM.

    deepspeed --num_gpus 8 launch/stage2.py --config run.yaml \
        model.projector_init=runs/stage1/export/projector.safetensors [section.key=value ...]
"""

import sys

from audio_llm.cli.stage import stage_main

if __name__ == "__main__":
    sys.exit(stage_main(2))
