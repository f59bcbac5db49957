"""Tree shapes from Medusa choice lists: the published trees, node order, validation."""

import pytest
import torch

from specbench.drafters.trees import named_trees, resolve_tree
from specbench.engine.tree import DraftTree, TreeShape
from specbench.errors import UserError


def medusa_attention_mask(choices):
    """The tree mask as Medusa's generate_medusa_buffers builds it (re-derived here as a cross-check)."""
    ordered = sorted(choices, key=lambda x: (len(x), x))
    n = len(ordered) + 1
    mask = torch.eye(n, n)
    mask[:, 0] = 1
    for i, path in enumerate(ordered):
        for c in range(len(path) - 1):
            mask[i + 1, ordered.index(path[: c + 1]) + 1] = 1
    return mask.bool()


@pytest.mark.parametrize("name", sorted(named_trees()))
def test_published_trees_load_and_match_medusas_mask(name):
    shape = resolve_tree(name)
    # chosen by `specbench tune` (docs/tune.md; its source says so); the published trees have 63 nodes
    tuned = named_trees()[name]["source"].startswith("specbench tune")
    assert len(shape) == (len(named_trees()[name]["paths"]) if tuned else 63)
    assert shape.depth == max(len(p) for p in named_trees()[name]["paths"]) <= 4
    assert shape.paths == sorted(shape.paths, key=lambda p: (len(p), p))
    tree = shape.draft_tree([torch.zeros(len(nodes), dtype=torch.long) for nodes in shape.level_nodes[1:]])
    assert torch.equal(tree.ancestor_mask(), medusa_attention_mask(named_trees()[name]["paths"]))
    assert tree.depths == shape.depths


def test_mc_sim_7b_63_levels():
    shape = resolve_tree("mc_sim_7b_63")
    assert [len(nodes) for nodes in shape.level_nodes[1:]] == [10, 28, 23, 2]
    assert shape.level_topk == [0, 10, 10, 10, 2]
    # level 2 rows are the level-1 nodes with children: ranks 0..9 of the root's children
    assert [shape.paths[i] for i in shape.expanded[1]] == [[r] for r in range(10)]
    # each level-2 node points at its parent's row
    for k, node in enumerate(shape.level_nodes[2]):
        assert shape.expanded[1][int(shape.parent_rows[2][k])] == shape.parents[node]


def test_chain_and_files(tmp_path):
    chain = resolve_tree("chain:3")
    assert chain.paths == [[0], [0, 0], [0, 0, 0]] and chain.parents == [-1, 0, 1]
    file = tmp_path / "t.json"
    file.write_text("[[1], [0], [0, 0]]")
    assert resolve_tree(str(file)).paths == [[0], [1], [0, 0]]
    file.write_text('{"paths": [[0]]}')
    assert resolve_tree(str(file)).paths == [[0]]


@pytest.mark.parametrize(
    "spec, message",
    [
        ([[0], [0, 1]], "no sibling [0, 0]"),
        ([[0], [1, 0]], "not prefix-closed: path [1, 0] has no parent path [1]"),
        ([[0], [0]], "lists path [0] twice"),
        ([[0], [2], [1, 0]], "path [2] has no sibling [1]"),
        ([[0], []], "non-empty paths"),
        ([[0], [-1]], "non-empty paths"),
        ("chain:0", "chain:K with K >= 1"),
        ("nope", "unknown tree 'nope'"),
        ("missing.json", "does not exist"),
    ],
)
def test_bad_trees_are_one_clear_error(spec, message):
    with pytest.raises(UserError) as info:
        TreeShape(spec) if isinstance(spec, list) else resolve_tree(spec)
    assert message in str(info.value)


@pytest.mark.parametrize("drafter, heads", [("medusa", "FasterDecoding/medusa-vicuna-{}-v1.3"),
                                            ("hydra", "ankner/hydra-vicuna-{}-v1.3")])
@pytest.mark.parametrize("size", ["7b", "13b", "33b"])
def test_catalogue_names_the_published_heads(drafter, heads, size):
    """`--drafter medusa|hydra --target vicuna-13b` (or its hub id) resolves to the published repository and tree."""
    from types import SimpleNamespace

    from specbench.drafters.registry import drafter_class

    cls = drafter_class(drafter)
    for name in (f"vicuna-{size}", f"lmsys/vicuna-{size}-v1.3"):
        target = SimpleNamespace(name=name, model_id=f"lmsys/vicuna-{size}-v1.3")
        settings = cls.settings(target, cls.Options())
        assert settings.heads == heads.format(size) and settings.tree.name == "mc_sim_7b_63"


def test_a_subtree_keeps_node_order_and_renumbers_parents():
    tree = DraftTree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, -1, 0, 1, 2]))
    sub = tree.subtree([True, False, True, False, True])
    assert sub.tokens.tolist() == [10, 12, 14] and sub.parents.tolist() == [-1, 0, 1]
    assert tree.subtree([True] * 5) is tree
    assert len(tree.subtree([False] * 5)) == 0
    with pytest.raises(ValueError, match="kept without its parent"):
        tree.subtree([False, True, True, False, False])  # node 2 without its parent 0
