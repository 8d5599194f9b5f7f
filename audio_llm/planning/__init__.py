"""Sizing a job before it runs: FLOPs per step and MFU (`flops`), and `audio-llm plan`'s memory
and time estimate (`plan`), from the published shapes in `model.arch`. No weights are downloaded.

May import `config`, `errors`, `audio` (frame arithmetic) and `model` (shapes, and the same
parameters training builds, on the meta device); never `train`, `data`, `evaluation` or `demo`.
"""
