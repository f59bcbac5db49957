"""simulate == online on the embedded default, SmolLM2-135M-Instruct (CPU, fp32)."""

import copy

import pytest
import torch

from specbench.runner import Benchmark, RunConfig
from specbench.simulate.log import read_log
from specbench.simulate.record import record
from specbench.simulate.runner import SimulateConfig, Simulator
from specbench.simulate.walk import Shape
from specbench.targets.hf import HFTarget
from specbench.workloads import load_workload

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

WORKLOAD, LIMIT, MAX_NEW = "builtin", 2, 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-sim")
    target = HFTarget.load("smollm2-135m", torch.device("cpu"), torch.float32)
    draft = copy.deepcopy(target.model)  # a layer-skip self-draft: the first 10 of 30 layers
    draft.model.layers = draft.model.layers[:10]
    draft.config.num_hidden_layers = 10
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:10]
    draft.save_pretrained(root / "draft")
    record(target, load_workload(WORKLOAD)[:LIMIT], WORKLOAD, MAX_NEW, root / "log.jsonl")
    return target, read_log(root / "log.jsonl"), root


def online_shapes(target, log, drafter, options):
    """(tree size, depth, accepted) per step and turn, as `run` measures them; its outputs are the log's."""
    config = RunConfig(drafter=drafter, drafter_options=options, workload=WORKLOAD, limit=LIMIT,
                       max_new_tokens=MAX_NEW, device="cpu", baseline=False, warmup=False)
    bench = Benchmark(config, target=target)
    online = []
    for prompt in bench.prompts:
        steps, turns = bench.measure_prompt(prompt)
        online += [[(s.tree_size, s.tree_depth, s.accepted) for s in steps if s.turn == t] for t in range(len(prompt.turns))]
        assert [t.output_ids for t in turns] == [t.output_ids for t in log.turns if t.prompt_id == prompt.id]
    return online


@pytest.mark.parametrize("drafter, options", [("draft-model", {"draft_model": "DRAFT"}), ("prompt-lookup", {})])
def test_simulate_equals_online_on_smollm2(setup, drafter, options):
    target, log, root = setup
    options = {k: str(root / "draft") if v == "DRAFT" else v for k, v in options.items()}
    simulation = Simulator(log, SimulateConfig(drafter, options, [Shape.chain(k) for k in (2, 4)], latency_steps=1), target).score()
    for result in simulation.results:
        online = online_shapes(target, log, drafter, {**options, "k": result.shape.k})
        assert [[(s.tree_size, s.tree_depth, s.accepted) for s in t] for t in result.steps] == online
        assert any(a for t in online for _, _, a in t)


@pytest.mark.parametrize("drafter, tree", [("medusa", "mc_sim_7b_63"), ("hydra", "mc_sim_7b_63_depth3")])
def test_head_drafters_simulate_equals_online_on_smollm2(setup, drafter, tree):
    """The bundled trained heads for SmolLM2 (Medusa: 4 heads; Hydra++: 3 heads, int8-stored), on
    Medusa's tree for their depth and on a chain; hidden states from one teacher-forced target forward."""
    target, log, _ = setup
    shapes = [Shape.from_spec(tree), Shape.from_spec("chain:3")]
    simulation = Simulator(log, SimulateConfig(drafter, {}, shapes, latency_steps=1), target).score()
    assert simulation.method == "teacher-forced" and simulation.hidden_source == "teacher-forced target forward"
    accepted = 0
    for result in simulation.results:
        online = online_shapes(target, log, drafter, {"tree": result.shape.spec})
        assert [[(s.tree_size, s.tree_depth, s.accepted) for s in t] for t in result.steps] == online, result.shape.spec
        accepted += sum(a for t in online for _, _, a in t)
    print(f"{drafter}: {accepted} draft tokens accepted, simulate == online")
    assert accepted, "the heads never hit: the comparison proves little"
