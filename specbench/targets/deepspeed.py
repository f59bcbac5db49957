"""The `deepspeed` target backend: the model split over N processes with DeepSpeed
inference tensor parallelism (AutoTP), then run by the same target classes as the
hf backend, on either engine (`--engine eager|fast`).

Each rank holds 1/N of every attention and MLP projection; DeepSpeed adds the
all-reduces. Kernel injection (`replace_with_kernel_inject=True`) is not used:
its fused attention builds its own causal mask and KV cache, which would
bypass the 4-D tree mask and the in-place KV compaction the decode loop relies
on. AutoTP keeps the transformers modules (only their linear layers are
sharded), so tree verification, `commit`, the static KV cache and (on CUDA)
graph capture work unchanged; with N > 1 a captured graph holds the step's
NCCL all-reduces. Which rank leads and how the others follow:
targets/parallel.py.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import sys

import torch
import torch.distributed as dist

from specbench.errors import UserError
from specbench.targets.hf import forward_bytes

INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19'"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what init_inference accepts (no float64)


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"--backend deepspeed needs DeepSpeed, which is not installed: `{INSTALL}`")


def under_launcher() -> bool:
    """True inside a process started by the `deepspeed` launcher (or torchrun)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launcher(tp: int) -> bool:
    """Whether `specbench run` must start itself again under the launcher: for 2+ ranks,
    when not already under it. One rank forms its own one-process group."""
    return tp > 1 and not under_launcher()


def free_port() -> int:
    with socket.socket() as s:  # other jobs on this host may hold the default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_count(device: torch.device) -> int:
    """How many tensor-parallel ranks this machine can host: CUDA GPUs, or CPU cores on CPU."""
    return torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)


def check(config, tp: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a tensor-parallel size this machine or this model cannot take, before any weights load.

    `config` is the target's transformers config."""
    if tp < 1:
        raise UserError("--tp must be at least 1")
    available = device_count(device)
    if tp > available:
        what = "CUDA GPU(s)" if device.type == "cuda" else "CPU core(s)"
        raise UserError(f"--tp {tp} needs {tp} devices but this machine has {available} {what}; use --tp {available} or less")
    if dtype not in DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise UserError(f"DeepSpeed inference runs {names}, not {str(dtype).removeprefix('torch.')}; pick --dtype accordingly")
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    for count, what in ((heads, "attention heads"), (kv_heads, "key/value heads")):
        if count % tp:
            divisors = [d for d in range(1, available + 1) if heads % d == 0 and kv_heads % d == 0]
            raise UserError(
                f"--tp {tp} does not divide the target's {count} {what}; use one of {', '.join(map(str, divisors))}"
            )


def launch_command(tp: int, device: torch.device, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The `deepspeed` launcher command (and environment) that runs `specbench ARGV` on `tp` local ranks."""
    launcher = shutil.which("deepspeed")
    command = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    command += ["--num_gpus", str(tp), "--master_port", str(free_port()), "--log_level", "error"]
    command += ["--no_local_rank", "--module", "specbench", *argv]
    env = dict(os.environ)
    if device.type == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    return command, env


def relaunch(tp: int, device: str, argv: list[str]) -> int:
    """Run `specbench ARGV` again under the `deepspeed` launcher on `tp` ranks; its exit status."""
    import subprocess

    from specbench.targets.loading import resolve_device

    command, env = launch_command(tp, resolve_device(device), argv)
    try:
        return subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:  # the launcher got the same signal and stops its ranks
        return 130


def _import_deepspeed(device: torch.device):
    """Import DeepSpeed for `device`; on CPU, without its shared-memory all-reduce.

    On the CPU accelerator DeepSpeed JIT-builds a shared-memory all-reduce op at
    start. A 2-process AutoTP run started without the launcher's LOCAL_SIZE died
    with SIGSEGV in it on both ranks; its kernels also fault on CPUs without
    AVX2/AVX512-BW, and building it took ~7 minutes here. Marked incompatible,
    collectives go through gloo: nothing to compile, nothing ISA-specific
    (docs/deepspeed.md)."""
    require_deepspeed()
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def join_group(device: torch.device, tp: int) -> torch.device:
    """Join the tensor-parallel group of `tp` ranks (one rank, `--tp 1`, forms its own);
    returns this rank's device. Under the launcher each rank calls this first."""
    deepspeed = _import_deepspeed(device)
    if needs_launcher(tp):
        raise UserError(f"--tp {tp} runs under the `deepspeed` launcher: use `specbench run --backend deepspeed --tp {tp}`")
    if not under_launcher():  # one rank: the environment the launcher would give it
        rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}
        os.environ.update(rank | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world != tp:
        raise UserError(f"--tp {tp} but the launcher started {world} process(es); launch with --num_gpus {tp}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:  # ranks on one host share its cores
        local = int(os.environ.get("LOCAL_SIZE", tp))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return device


def shard(model, device: torch.device, dtype: torch.dtype, tp: int):
    """This rank's shard of a whole transformers model (on the host, or any device), by AutoTP
    over the `tp` ranks of the group joined with `join_group`, moved to `device`."""
    deepspeed = _import_deepspeed(device)
    with contextlib.redirect_stdout(sys.stderr):  # AutoTP prints its plan; stdout is for results (--json)
        inference = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False)
    return inference.module.to(device).eval()


def load(name: str, device: torch.device, dtype: torch.dtype, tp: int, engine: str):
    """This rank's target: the model sharded by AutoTP over `tp` ranks, on `engine` (the same
    target classes as the hf backend). Under the launcher each rank calls this; one rank
    (`--tp 1`) forms its own one-process group."""
    from specbench.targets.fast import target_class
    from specbench.targets.loading import load_causal_lm

    device = join_group(device, tp)
    # the full model on the host; AutoTP keeps this rank's shard and moves it to the device
    model, tokenizer, source = load_causal_lm(name, torch.device("cpu"), dtype)
    total = forward_bytes(model)
    module = shard(model, device, dtype, tp)
    return target_class(engine)(module, tokenizer, name=name, model_id=source.model_id, backend="deepspeed", weight_bytes=total)
