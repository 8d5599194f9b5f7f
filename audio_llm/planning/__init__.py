"""Sizing a job before it runs: published model shapes (`arch`), FLOPs per step and MFU
(`flops`), and `audio-llm plan`'s memory and time estimate (`plan`). No weights are downloaded.

May import `config`, `errors`, `model` (to count the same parameters training builds); never
`train`, `data` or `demo`.
"""
