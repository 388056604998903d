"""How a model and an environment map onto ranks, without starting any: head and layer splits,
impossible layouts, placement from the environment, the wire format of a batch, and the bubble
arithmetic."""
from __future__ import annotations

import pytest
import torch

from sarathi_engine.config import ParallelConfig
from sarathi_engine.launch import Placement, placement_from_env, resolved_master
from sarathi_engine.model.layers import head_shard
from sarathi_engine.model.llama import stage_layers
from sarathi_engine.model_runner import make_inputs
from sarathi_engine.pipeline import StageTiming, bubble_share, pack, unpack


def shards(heads: int, kv: int, tp: int):
    return [head_shard(heads, kv, tp, r) for r in range(tp)]


def test_smollm2_heads_split_unevenly_by_whole_kv_groups_over_two_ranks():
    # 9 query heads in 3 groups of 3: rank 0 takes two groups, rank 1 one.
    a, b = shards(9, 3, 2)
    assert (a.heads, a.kv_heads) == (range(0, 6), range(0, 2))
    assert (b.heads, b.kv_heads) == (range(6, 9), range(2, 3))


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 2), (9, 3, 3), (32, 8, 8), (12, 12, 5), (4, 2, 2), (8, 2, 4),
                                         (8, 1, 8)])
def test_every_query_head_is_computed_once_with_its_own_kv_head(heads, kv, tp):
    group = heads // kv
    computed = []
    for shard in shards(heads, kv, tp):
        computed += shard.heads
        assert {h // group for h in shard.heads} <= set(shard.kv_heads)
    assert computed == list(range(heads))


def test_fewer_kv_heads_than_ranks_replicates_each_kv_head():
    assert [s.kv_heads for s in shards(8, 2, 4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert [len(s.heads) for s in shards(8, 2, 4)] == [2, 2, 2, 2]


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 4), (4, 2, 8), (6, 2, 3)])
def test_impossible_head_layouts_name_the_numbers(heads, kv, tp):
    with pytest.raises(ValueError, match=f"{heads} attention heads with {kv} KV heads cannot be split over "
                                         f"tensor-parallel size {tp}"):
        head_shard(heads, kv, tp, 0)


def test_stages_take_contiguous_layers_and_more_stages_than_layers_is_an_error():
    assert [stage_layers(30, 4, s) for s in range(4)] == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    with pytest.raises(ValueError, match="pipeline-parallel size 3 is larger than the model's 2 layers"):
        stage_layers(2, 3, 0)


def test_without_pod_variables_one_machine_holds_every_rank():
    assert placement_from_env(ParallelConfig(2, 2), {}) == Placement(0, 1, 4, None)


def test_pods_from_torch_style_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "engine-0.engine-ranks", "MASTER_PORT": "29501"}
    placement = placement_from_env(ParallelConfig(2, 2), env)
    assert placement == Placement(1, 2, 2, "engine-0.engine-ranks:29501")
    assert placement.ranks == range(2, 4)


def test_pods_from_leaderworkerset_variables_default_to_port_29500():
    env = {"LWS_WORKER_INDEX": "0", "LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "leader.svc"}
    assert placement_from_env(ParallelConfig(1, 2), env) == Placement(0, 2, 1, "leader.svc:29500")


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "h"},
     "WORLD_SIZE=3 pods cannot hold tensor-parallel 2 x pipeline-parallel 2 = 4 ranks"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 pods need MASTER_ADDR"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK must be an integer, got 'one'"),
])
def test_environments_that_do_not_fit_the_degrees_are_refused(env, message):
    with pytest.raises(ValueError, match=message):
        placement_from_env(ParallelConfig(2, 2), env)


def test_a_batch_survives_the_wire():
    t = torch.tensor
    inputs = make_inputs(t([5, 6, 7, 8]), t([0, 1, 2, 9]), t([32, 33, 34, 57]), [3, 1], [3, 10],
                         t([[2, 0], [1, 3]]), [2, 3], torch.device("cpu"))
    header, body = pack(inputs)
    back = unpack(header, body, torch.device("cpu"))
    assert back.input_ids.tolist() == [5, 6, 7, 8] and back.positions.tolist() == [0, 1, 2, 9]
    assert back.meta.slot_mapping.tolist() == [32, 33, 34, 57]
    assert (back.meta.query_lens, back.meta.context_lens, back.meta.num_prefills) == ([3, 1], [3, 10], 1)
    assert back.meta.block_tables.tolist() == [[2, 0], [1, 3]]
    assert back.logit_rows == [2, 3]
    assert back.meta.query_start_loc.tolist() == [0, 3, 4]


def test_bubble_share_counts_each_stage_once_and_weighs_by_time():
    timings = [StageTiming(0, 0, busy=6.0, span=10.0), StageTiming(1, 0, busy=5.0, span=10.0),
               StageTiming(2, 1, busy=2.0, span=10.0), StageTiming(3, 1, busy=9.0, span=10.0)]
    assert bubble_share(timings) == pytest.approx((4 + 8) / 20)
    assert timings[2].idle_share == pytest.approx(0.8)


def test_rank_zero_is_reached_by_address_once_its_name_resolves():
    answers = iter([OSError("Name or service not known")] * 2 + ["10.0.3.7"])
    naps = []

    def resolve(host):
        assert host == "chat-lws-0.chat-lws.ns"
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    master = resolved_master("chat-lws-0.chat-lws.ns:29500", 60, resolve, clock=lambda: 0.0, sleep=naps.append)
    assert master == "10.0.3.7:29500" and len(naps) == 2


def test_a_name_that_never_resolves_fails_naming_it_after_the_timeout():
    now = iter(range(0, 100, 30))

    def resolve(host):
        raise OSError("Name or service not known")

    with pytest.raises(RuntimeError, match="'chat-0-0.chat-ranks' did not resolve within 60s"):
        resolved_master("chat-0-0.chat-ranks:29500", 60, resolve, clock=lambda: next(now), sleep=lambda s: None)


@pytest.mark.parametrize("master", ["127.0.0.1:29500", "[::1]:29500"])
def test_addresses_pass_through_the_system_resolver(master):
    assert resolved_master(master, 1) == master
