"""Real `deepspeed` launches of launch/stage1.py and stage2.py: 2 CPU ranks on gloo, tiny models,
the sample shards in shards/sample/audio. Every launch has its own timeout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audio_llm.dist import free_port

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
SHARDS = REPO / "shards" / "sample" / "audio"
TIMEOUT = 300


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
        PYTHONPATH=str(REPO),
    )
    env.update(extra or {})
    return env


def common(tiny_models, out_dir: Path, steps: int) -> list[str]:
    return [
        f"model.encoder={tiny_models['whisper']}",
        f"model.llm={tiny_models['qwen2vl']}",
        f"data.train_shards={SHARDS}",
        "data.batch_size=2",
        "data.num_workers=0",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.save_every=2",
        "train.warmup_steps=2",
        "train.lr=1e-2",
        f"train.out_dir={out_dir}",
    ]


def launch(
    stage: int,
    overrides: list[str],
    *,
    ds_config: str = "ds_configs/zero2.json",
    env: dict | None = None,
    gpus: int = 2,
    expect_ok: bool = True,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        str(gpus),
        "--master_port",
        str(port),
        str(REPO / "launch" / f"stage{stage}.py"),
        "--deepspeed_config",
        str(REPO / ds_config),
        *(extra or []),
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=TIMEOUT
    )
    if expect_ok:
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # DeepSpeed's CPU shm allreduce buffers (64 MiB per rank) are released, killed run or not
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step train/loss from metrics.jsonl (later lines win: a resumed run rewrites steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.fixture(scope="module")
def stage1_run(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    launch(1, common(tiny_models, out, steps=12))
    return out


def test_stage1_trains_checkpoints_exports_and_logs(stage1_run):
    summary = json.loads((stage1_run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(set(summary["parameter_digests"])) == 1  # identical weights on both ranks
    steps = losses(stage1_run)
    assert sorted(steps) == list(range(1, 13))
    first, last = sum(steps[s] for s in (1, 2, 3)) / 3, sum(steps[s] for s in (10, 11, 12)) / 3
    assert last < first, steps
    assert (stage1_run / "export" / "projector.safetensors").is_file()
    assert not (stage1_run / "export" / "adapter").exists()
    complete = sorted(p.name for p in (stage1_run / "checkpoints").glob("step_*/COMPLETE"))
    assert len(complete) == 3  # keep_last

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage1_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s"):
        assert tag in tags, sorted(tags)
    for tag in ("perf/audio_s_per_s", "perf/tokens_per_s", "perf/padding_ratio"):
        assert tag in tags, sorted(tags)
    assert "perf/data_wait_frac" in tags and "perf/step_s_skew" in tags
    assert len(events.Scalars("train/loss")) == 12


def test_checkpoints_hold_no_frozen_weight(stage1_run, tiny_models):
    from audio_llm.train.checkpoint import latest

    # Qwen2-VL's lm_head.weight is the frozen input embedding under a second name: not saved.
    tag = latest(stage1_run)
    module = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and all(name.startswith("projector.") for name in module), sorted(module)
    text = json.loads((tiny_models["qwen2vl"] / "config.json").read_text())["text_config"]
    embedding_bytes = 4 * text["vocab_size"] * text["hidden_size"]  # float32 on the CPU
    assert (tag / "mp_rank_00_model_states.pt").stat().st_size < embedding_bytes


@pytest.mark.parametrize(
    "ds_config, extra",
    [
        ("ds_configs/zero2.json", []),
        # ZeRO-3 partitions the embedding table and blank the CTC head reads: they must be
        # gathered, in the loss and in joint CTC/LLM decoding during the WER evals
        ("ds_configs/zero3.json", ["train.ctc_weight=0.5", "eval.ctc_weight=0.5"]),
    ],
    ids=["zero2", "zero3-ctc"],
)
def test_stage2_lora_export_loads_with_stock_peft(
    stage1_run, tiny_models, tmp_path, ds_config, extra
):
    out = tmp_path / "stage2"
    projector = stage1_run / "export" / "projector.safetensors"
    wer_every_3 = [f"data.eval_shards={SHARDS}", "eval.every=3", "eval.limit=4"]
    wer_every_3 += ["eval.max_new_tokens=4", "eval.batch_size=2"]
    launch(
        2,
        [
            *common(tiny_models, out, steps=6),
            f"model.projector_init={projector}",
            *wer_every_3,
            *extra,
        ],
        ds_config=ds_config,
    )
    summary = json.loads((out / "summary.json").read_text())
    if extra:
        logged = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        ctc = [row["train/ctc_loss"] for row in logged if "train/ctc_loss" in row]
        assert ctc and all(0 < value < float("inf") for value in ctc)
        assert (out / "export" / "ctc_blank.safetensors").is_file()  # gathered, or refused
    assert len(set(summary["parameter_digests"])) == 1
    assert sorted(summary["eval_wer"], key=int) == ["3", "6"]  # WER during training, ZeRO-3 too
    # six steps of a tiny model leave errors: a WER of None or 0 would mean nothing was scored
    assert all(w is not None and w > 0 for w in summary["eval_wer"].values())
    adapter = out / "export" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 28 and all(t.numel() > 0 for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # it trained

    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    stock = Qwen2VLForConditionalGeneration.from_pretrained(tiny_models["qwen2vl"])
    plain = stock(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    tuned = PeftModel.from_pretrained(stock, adapter)(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert not torch.allclose(plain, tuned.logits)

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = "step_00000006"
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    assert any(k.startswith("projector.") for k in state)
    assert any("lora_B" in k for k in state)


@pytest.mark.timeout(900)  # four launches: slow on a loaded 2-core machine
def test_kill_and_resume_gives_the_same_losses(tiny_models, tmp_path):
    ref = tmp_path / "ref"
    launch(1, common(tiny_models, ref, steps=8))
    reference = losses(ref)

    run = tmp_path / "killed"
    # killed while saving step 6: its folder has no COMPLETE marker, so auto picks step 4
    proc = launch(
        1,
        common(tiny_models, run, steps=8),
        env={"AUDIO_LLM_FAULT": "in_save:6"},
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert (run / "checkpoints" / "step_00000006").is_dir()
    assert not (run / "checkpoints" / "step_00000006" / "COMPLETE").exists()
    # resumed from step 4; then killed right after step 7 (a plain SIGKILL between steps)
    proc = launch(
        1,
        common(tiny_models, run, steps=8),
        env={"AUDIO_LLM_FAULT": "after_step:7"},
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "resumed from" in proc.stdout + proc.stderr
    launch(1, common(tiny_models, run, steps=8))  # resumes from step 6, finishes
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["start_step"] == 6
    # one curve: each resume dropped the rows the killed attempt logged after its checkpoint
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9)), logged


def test_two_nodes_on_loopback_train_together(tiny_models, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    out = tmp_path / "two_nodes"
    procs = []
    for node_rank in (0, 1):
        cmd = [
            DEEPSPEED,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--num_nodes",
            "2",
            "--num_gpus",
            "1",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            str(REPO / "launch" / "stage1.py"),
            "--deepspeed_config",
            str(REPO / "ds_configs" / "zero2.json"),
            *common(tiny_models, out, steps=4),
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["parameter_digests"])) == 1


@pytest.mark.parametrize(
    ("stage", "overrides", "message"),
    [
        (2, [], "stage 2 starts from a stage-1 projector"),
        (1, ["data.train_shards=/nonexistent/shards"], "no such file or folder"),
        (1, ["data.batch_size=13"], "cannot give every rank one batch"),
    ],
)
def test_bad_config_fails_before_any_rank_trains(tiny_models, tmp_path, stage, overrides, message):
    proc = launch(
        stage, [*common(tiny_models, tmp_path / "bad", steps=2), *overrides], expect_ok=False
    )
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_eval_gives_the_same_wer_on_one_and_two_ranks(stage1_run, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"eval{ranks}"
        cmd = [
            torchrun,
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            "-m",
            "audio_llm.cli",
            "eval",
            "--run-dir",  # torchrun would read --run as its own --run-path
            str(stage1_run),
            "--shards",
            str(SHARDS),
            "--out",
            str(out),
            "--batch-size",
            "5",
            "--max-new-tokens",
            "8",
        ]
        proc = subprocess.run(
            cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        rows = [json.loads(line) for line in (out / "utterances.jsonl").read_text().splitlines()]
        results[ranks] = (summary, {r["id"]: r["hyp"] for r in rows})
    assert results[1][0]["utterances"] == results[2][0]["utterances"] == 24
    assert results[1][0]["wer"] == results[2][0]["wer"]
    assert results[1][1] == results[2][1]


def _cut_inside_sample(path: Path, keep: int) -> None:
    """Truncate a shard inside the first member of its sample `keep + 1`: `keep` samples survive."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first = next(m for m in members if m.name.split(".")[0] == keys[keep])
    path.write_bytes(path.read_bytes()[: first.offset_data + 100])


@pytest.fixture(scope="module")
def cut_on_both_ranks(tiny_models, tmp_path_factory):
    """The sample shards with the first shard each of the 2 ranks reads cut after 4 of its 6
    samples (20 of 24 readable), and a 2-rank stage-1 run trained on them."""
    from audio_llm.config import DataConfig
    from audio_llm.data import ShardSet, plan_epoch

    folder = tmp_path_factory.mktemp("cut") / "shards"
    shutil.copytree(SHARDS, folder)
    shards = ShardSet.open(str(folder)).shards
    plan = plan_epoch(
        shards, world_size=2, num_workers=0, batch_size=2, seed=DataConfig().seed, epoch=0
    )
    for rank in (0, 1):
        _cut_inside_sample(folder / plan.assignments[(rank, 0)][0].name, keep=4)
    run = folder.parent / "run"
    # the whole pass sits in the shuffle buffer before the first batch: both cuts are met at once
    launch(
        1, [*common(tiny_models, run, steps=4), f"data.train_shards={folder}", "train.log_every=2"]
    )
    return folder, run


@pytest.mark.timeout(900)  # a 2-rank launch (the fixture's) and more, on shared CPUs
def test_data_problems_of_every_rank_are_summed_in_metrics_and_summary(cut_on_both_ranks):
    _, run = cut_on_both_ranks
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_problems"]["corrupt_shard"] == 2  # one per rank, rank 1's included
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row.get("data/corrupt_shard") for row in rows if "train/loss" in row}
    assert logged == {2: 2, 4: 2}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/corrupt_shard")] == [2, 2]


@pytest.mark.timeout(900)  # a 2-rank launch (the fixture's) and more, on shared CPUs
def test_eval_on_two_ranks_counts_a_cut_shard_once_and_says_what_it_scored(
    cut_on_both_ranks, tmp_path
):
    folder, run = cut_on_both_ranks
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out, whole = tmp_path / "eval", tmp_path / "eval_whole"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "audio_llm.cli", "eval", "--run-dir", str(run)]
    cmd += ["--shards", str(folder), str(SHARDS), "--out", str(out), str(whole)]  # two sets
    cmd += ["--batch-size", "5", "--max-new-tokens", "4"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["corrupt_shard"] == 2  # each cut shard once, not once per rank
    assert summary["utterances"] == 20
    assert "shards: WER" in proc.stdout  # each set's headline names it (both are "shards")
    assert "over 20 of 24 indexed utterances (4 not scored" in proc.stdout, proc.stdout
    # the second set, in the same launch, is scored on its own: all 24, no problem carried over
    second = json.loads((whole / "summary.json").read_text())
    assert second["utterances"] == 24 and not second["data"].get("corrupt_shard")
    assert "over 24 of 24 indexed utterances" in proc.stdout, proc.stdout
