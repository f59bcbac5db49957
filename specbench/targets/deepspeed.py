"""The `deepspeed` target backend: the hf target, split over N processes with
DeepSpeed inference tensor parallelism (AutoTP).

Each rank holds 1/N of every attention and MLP projection; DeepSpeed adds the
all-reduces. Kernel injection (`replace_with_kernel_inject=True`) is not used:
its fused attention builds its own causal mask and KV cache, which would
bypass the 4-D tree mask and the in-place KV compaction the decode loop relies
on. AutoTP keeps the transformers modules (only their linear layers are
sharded), so `HFTarget`'s tree verification and `commit` work unchanged.

Rank 0 (the leader) runs the whole benchmark: drafting, acceptance, records,
output. The other ranks (followers) only serve the leader's target calls: the
leader broadcasts each prefill prompt, each verify step's root, tree tokens
and parents, and each commit's accepted nodes, and every rank then runs the
same forward (whose all-reduces need all of them).
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

from specbench.engine.tree import DraftTree
from specbench.errors import UserError
from specbench.targets.hf import HFTarget, forward_bytes

INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19'"

# what the leader broadcasts before each target call
PREFILL, VERIFY, COMMIT, STOP = range(4)
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


class DeepSpeedTarget(HFTarget):
    backend = "deepspeed"

    def __init__(self, model, tokenizer=None, name: str = "", model_id: str = "", tp: int = 1, total_bytes: int = 0) -> None:
        super().__init__(model, tokenizer, name=name, model_id=model_id)
        text = self.config.get_text_config()
        # AutoTP shards the LM head along its input (hidden) dimension; rows are still the vocabulary
        self.hidden_size = text.hidden_size
        self.tp = tp
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.leads = self.rank == 0
        self.total_bytes = total_bytes
        self._stopped = False

    @classmethod
    def load(cls, name: str, device: torch.device, dtype: torch.dtype, tp: int = 1) -> DeepSpeedTarget:
        from specbench.targets.loading import load_causal_lm

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
        # the full model on the host; AutoTP keeps this rank's shard and moves it to the device
        model, tokenizer, source = load_causal_lm(name, torch.device("cpu"), dtype)
        total = forward_bytes(model)
        with contextlib.redirect_stdout(sys.stderr):  # AutoTP prints its plan; stdout is for results (--json)
            engine = deepspeed.init_inference(
                model, tensor_parallel={"tp_size": tp}, dtype=dtype, replace_with_kernel_inject=False
            )
        module = engine.module.to(device).eval()
        return cls(module, tokenizer, name=name, model_id=source.model_id, tp=tp, total_bytes=total)

    def forward_bytes(self) -> int:
        """Weight bytes of one forward over all ranks together (each rank reads about 1/tp of them)."""
        return self.total_bytes or super().forward_bytes()

    # --- the leader broadcasts each call; followers receive it ------------------

    def _send(self, op: int, root: int = 0, *payload: torch.Tensor) -> None:
        if self.tp == 1:
            return
        n = payload[0].numel() if payload else 0
        dist.broadcast(torch.tensor([op, root, n], device=self.device), src=0)
        if n:
            dist.broadcast(torch.cat([p.reshape(-1).to(self.device, torch.long) for p in payload]), src=0)

    def _receive(self, parts: int = 1) -> tuple[int, int, list[torch.Tensor]]:
        header = torch.empty(3, dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        op, root, n = header.tolist()
        if op == STOP or n == 0:
            return op, root, [torch.empty(0, dtype=torch.long, device=self.device)] * (2 if op == VERIFY else 1)
        payload = torch.empty(n * (2 if op == VERIFY else 1), dtype=torch.long, device=self.device)
        dist.broadcast(payload, src=0)
        return op, root, list(payload.split(n))

    def prefill(self, prompt: torch.Tensor, taps=(), max_positions: int | None = None):
        if self.leads:
            self._send(PREFILL, 0, prompt)
        return super().prefill(prompt, taps, max_positions)

    def verify(self, root: int, tree: DraftTree, taps=()):
        if self.leads:
            self._send(VERIFY, root, tree.tokens, tree.parents)
        return super().verify(root, tree, taps)

    def commit(self, accepted_nodes: list[int]) -> None:
        if self.leads:
            self._send(COMMIT, 0, torch.tensor(accepted_nodes, dtype=torch.long))
        super().commit(accepted_nodes)

    def follow(self) -> None:
        """A follower's whole job: run the leader's target calls until it stops."""
        while True:
            op, root, payload = self._receive()
            if op == STOP:
                return self._leave_group()
            if op == PREFILL:
                super().prefill(payload[0])
            elif op == VERIFY:
                super().verify(root, DraftTree(payload[0], payload[1]))
            elif op == COMMIT:
                super().commit(payload[0].tolist())

    def stop(self) -> None:
        """The leader releases its followers (once; safe to call again)."""
        if self.leads and not self._stopped:
            self._stopped = True
            self._send(STOP)
            self._leave_group()

    @staticmethod
    def _leave_group() -> None:
        """Every rank leaves the process group together before exiting: a rank that exits with
        gloo's threads still up intermittently died in std::terminate ("terminate called without
        an active exception"), failing the launcher's run after all results were written."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
            dist.destroy_process_group()
