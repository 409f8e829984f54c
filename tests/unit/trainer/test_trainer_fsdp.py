"""The pieces of `sharding: fsdp` that need no process group: which rows each rank holds, how wrapped
parameter names map back to checkpoint keys, and rank 0's seeds for unseeded samples."""

from __future__ import annotations

import pytest
import torch

from tests.unit.trainer.test_trainer_lora import LlamaLike
from tinkerkube_contract.pod_api import OpKind
from tinkerkube_trainer.codec import SampleParams
from tinkerkube_trainer.distributed import with_seed
from tinkerkube_trainer.engine_api import PreparedOp
from tinkerkube_trainer.fsdp import chunk_bounds, decoder_layers
from tinkerkube_trainer.multilora import AdapterSites
from tinkerkube_trainer.op_decode import SamplePayload


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 49, 576])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_chunk_bounds_are_torch_chunk(rows: int, world: int) -> None:
    """FSDP2 shards dim 0 as torch.chunk does (trailing ranks may hold fewer rows, or none)."""
    pieces = list(torch.arange(rows).chunk(world))
    for rank in range(world):
        start, end = chunk_bounds(rows, rank, world)
        want = pieces[rank].tolist() if rank < len(pieces) else []
        assert list(range(start, end)) == want


def test_checkpoint_names_undo_the_routed_wrapping() -> None:
    model = LlamaLike()
    before = [name for name, _ in model.named_parameters()]
    sites = AdapterSites.install(model)
    after = [name for name, _ in model.named_parameters()]
    assert any(".base." in name for name in after)  # the wrapping renamed them
    assert [sites.checkpoint_name(name) for name in after] == before


def test_decoder_layers_are_the_model_layer_list() -> None:
    model = LlamaLike()
    assert decoder_layers(model) == list(model.layers)
    with pytest.raises(ValueError, match="no decoder layer list"):
        decoder_layers(torch.nn.Linear(2, 2))


def _sample_op(seed: int | None) -> PreparedOp:
    return PreparedOp(OpKind.SAMPLE, SamplePayload(SampleParams(prompt=(1, 2), seed=seed), None), "m")


def test_unseeded_samples_get_a_seed_from_rank_0_and_seeded_ones_keep_theirs() -> None:
    state = torch.get_rng_state()
    seeded = _sample_op(42)
    assert with_seed(seeded) is seeded
    drawn = [with_seed(_sample_op(None)) for _ in range(3)]
    seeds = [op.payload.params.seed for op in drawn]
    assert all(isinstance(s, int) for s in seeds) and len(set(seeds)) == 3
    assert all(op.payload.params.prompt == (1, 2) and op.model_id == "m" for op in drawn)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG never moves
