"""The fit sweep's parts: HLO reading (collectives, FLOPs, loop counts), the roofline arithmetic, and the
batch search over real compiles of the tiny model for v5e:2x2 against a small HBM limit (needs libtpu)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chameleon_jax import aot
from chameleon_jax.aot import hlo, roofline, sweep

SCAN = 3


@pytest.fixture(scope="module")
def known_program():
    """A shard_map over the 4 chips of v5e:2x2 whose collectives and matmuls are known by hand:
    inside a 3-step scan, an all-gather of a bf16[64,256] shard and a bf16 [256,256]x[256,256] matmul
    of the gathered rows; beside it, a psum of an f32[64,256] input and a psum_scatter of a bf16[512,128] operand."""
    mesh = jax.sharding.Mesh(np.array(aot.topology_devices("v5e:2x2")), ("x",))

    def per_chip(a, b, w, d):
        def body(c, _):
            g = jax.lax.all_gather(c, "x", tiled=True)             # bf16[256,256] gathered
            y = jnp.dot(g, w, preferred_element_type=jnp.float32)
            return (c + y.reshape(4, 64, 256).sum(0)).astype(jnp.bfloat16), None
        a, _ = jax.lax.scan(body, a, None, length=SCAN)
        return a, jax.lax.psum(d, "x"), jax.lax.psum_scatter(b, "x", tiled=True)

    f = jax.jit(jax.shard_map(per_chip, mesh=mesh, in_specs=(P("x"), P(), P(), P("x")),
                              out_specs=(P("x"), P(), P("x"))))
    args = (jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("x"))),
            jax.ShapeDtypeStruct((512, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(mesh, P("x"))))
    return f.lower(*args).compile().as_text()


def test_collective_bytes_by_kind_count_every_loop_iteration(known_program):
    cost = hlo.step_cost(known_program, num_devices=4)
    shard = 64 * 256 * 2  # bf16[64,256] per chip
    # all-gather: the gathered bf16[256,256] (4 shards), once per scan step.
    assert cost.collective_bytes["all-gather"] == SCAN * 4 * shard
    assert cost.collective_count["all-gather"] == SCAN
    assert cost.collective_bytes["all-reduce"] == 64 * 256 * 4  # the f32 sum
    assert cost.collective_bytes["reduce-scatter"] == 512 * 128 * 2
    assert "all-to-all" not in cost.collective_bytes
    # Ring traffic a chip sends: AG 3/4 of the result, AR 2·3/4 of the operand, RS 3/4 of the operand.
    assert cost.wire_bytes == SCAN * 3 * shard + 2 * 64 * 256 * 4 * 3 / 4 + 512 * 128 * 2 * 3 / 4
    assert cost.unknown_trip_counts == 0


def test_matmul_flops_count_every_loop_iteration(known_program):
    # XLA's cost_analysis counts the loop body once; the HLO reading multiplies by the trip count.
    assert hlo.step_cost(known_program, num_devices=4).flops == SCAN * 2 * 256 * 256 * 256


def test_trip_count_falls_back_to_the_loop_condition():
    text = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups=[2,2]<=[4], to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p.1: (s32[], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[8]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> (s32[], f32[8]) {
  %a = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %a)
  ROOT %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
}
"""
    cost = hlo.step_cost(text, num_devices=4)
    assert cost.collective_count == {"all-reduce": 7}
    assert cost.collective_bytes == {"all-reduce": 7 * 32}
    assert cost.wire_bytes == 7 * 2 * 32 * (2 - 1) / 2  # groups of 2 from the iota form [2,2]<=[4]


def test_roofline_takes_the_slowest_term_and_labels_it():
    v5p = roofline.chip("v5p:4x4x4")
    e = roofline.estimate(v5p, flops=459e12, hbm_bytes=2765e9 / 2, wire_bytes=600e9 * 2, model_flops=459e12 / 2)
    assert (e.compute_s, e.memory_s, e.network_s) == pytest.approx((1.0, 0.5, 2.0))
    assert e.step_s == pytest.approx(2.0) and e.bound == "network"
    assert e.serial_step_s == pytest.approx(3.5)
    assert e.mfu == pytest.approx(0.25) and e.serial_mfu == pytest.approx(0.5 / 3.5)
    with pytest.raises(ValueError, match="CHIPS"):
        roofline.chip("v9x:2x2")


def test_slice_names_count_v5p_tensorcores():
    assert sweep.slice_name("v5p:4x4x4") == "v5p-128 (64 chips)"
    assert sweep.slice_name("v5e:16x16") == "v5e-256 (256 chips)"


def _synthetic(b, per_b=10, fixed=100, bump_at=None):
    total = fixed + per_b * b + (1000 if bump_at and b >= bump_at else 0)
    plan = sweep.Plan((4, 1, 1), "none", "xla", b)
    return sweep.Probe("x", "v5e:2x2", dataclasses.asdict(plan), total <= 175, 175, total)


def test_search_lands_on_the_boundary_of_an_affine_memory_in_four_compiles():
    calls = []
    best, probes = sweep.largest_fitting_batch(lambda b: calls.append(b) or _synthetic(b), limit=175)
    assert best.plan["batch_per_shard"] == 7        # 100 + 10·7 = 170 <= 175 < 180
    assert calls == [1, 2, 7, 8]


def test_search_still_finds_the_boundary_when_memory_jumps():
    # A step at 5 (e.g. XLA switching layouts) breaks the line; the search steps down to the boundary.
    best, probes = sweep.largest_fitting_batch(lambda b: _synthetic(b, bump_at=5), limit=175, max_probes=10)
    assert best.plan["batch_per_shard"] == 4
    assert any(p.plan["batch_per_shard"] == 5 and not p.fits for p in probes)


def test_global_batch_plan_splits_into_microbatches_of_at_most_the_fitting_batch():
    best = sweep.Plan((1, 64, 1), "dots_no_batch", "splash", 6)
    g = sweep.global_batch_plan(best, 2048)     # 32 sequences per shard: 4 x 8 (6 does not divide 32)
    assert (g.batch_per_shard, g.microbatches, g.global_batch) == (4, 8, 2048)


def test_tiny_sweep_finds_the_largest_batch_under_a_small_hbm_limit(tmp_path):
    """Real compiles for v5e:2x2: measure batch 1 and 2, put the limit half a sequence above batch 2,
    and the search must stop at 2 with 3 compiled and refused (3 compiles in all)."""
    config = sweep.load_config("experiments/tiny.py")
    config.train.seq_len = 256  # f32 logits of 256 x 1024 per sequence: a clear per-sequence slope
    config.train.batch_size = 4
    case = sweep.Case("tiny", "experiments/tiny.py", "v5e:2x2")
    cache = sweep.ProbeCache(str(tmp_path / "probes.jsonl"))
    base = sweep.config_plan(config, 4, "xla")
    m1, m2 = (sweep.compile_probe(case, config, dataclasses.replace(base, batch_per_shard=b, microbatches=1))
              for b in (1, 2))
    slope = m2.total_bytes - m1.total_bytes
    assert slope > 0 and m1.hlo["flops"] > 0 and m1.estimate["step_s"] > 0
    limit = m2.total_bytes + slope // 2
    for p in (m1, m2):
        cache.put(dataclasses.replace(p, hbm_limit=limit, fits=p.total_bytes <= limit))
    result = sweep.sweep_case(case, attention="xla", cache=cache, hbm_limit=limit, max_probes=4,
                              log=lambda s: None, config=config)
    best = result.best.plan["batch_per_shard"]
    assert best == 2 and result.best.total_bytes <= limit
    above = [p for p in result.probes if p.plan["batch_per_shard"] == best + 1]
    assert above and not above[0].fits and above[0].total_bytes > limit
    # The probe log resumes: a second sweep compiles nothing.
    again = sweep.sweep_case(case, attention="xla", cache=sweep.ProbeCache(cache.path), hbm_limit=limit,
                             max_probes=4, log=lambda s: pytest.fail(f"recompiled: {s}"), config=config)
    assert again.best.plan_obj == result.best.plan_obj


def test_config_plan_reads_the_mesh_and_refuses_a_global_batch_that_does_not_split():
    config = sweep.load_config("experiments/chameleon_7b.py")
    plan = sweep.config_plan(config, 64)             # 2,048 = 1 per shard x 64 shards x 32 microbatches
    assert (plan.mesh, plan.batch_per_shard, plan.microbatches, plan.global_batch) == ((1, 64, 1), 1, 32, 2048)
    assert plan.attention == "splash" and plan.remat == config.model.remat
    with pytest.raises(ValueError, match="microbatches"):
        sweep.config_plan(config, 256)               # 2,048 / (32 x 256) is not whole
    assert sweep.config_plan(config, 256, exact=False).mesh == (1, 256, 1)


def test_a_probe_log_that_stops_mid_search_renders_the_largest_batch_it_holds(tmp_path):
    from chameleon_jax.aot import table
    config = sweep.load_config("experiments/tiny.py")
    case = sweep.Case("tiny", "experiments/tiny.py", "v5e:2x2")
    limit = 16 * aot.GiB
    with pytest.raises(sweep.NotCompiled):
        sweep.sweep_case(case, attention="xla", cache=sweep.ProbeCache(None), compile=False, config=config)
    plan = dataclasses.replace(sweep.config_plan(config, 4, "xla"), batch_per_shard=1, microbatches=1)
    cache = sweep.ProbeCache(str(tmp_path / "probes.jsonl"))
    cache.put(sweep.Probe(case.key, case.topology, dataclasses.asdict(plan), True, limit, 2 * aot.GiB))
    result = sweep.sweep_case(case, attention="xla", cache=sweep.ProbeCache(cache.path), compile=False,
                              config=config, log=lambda s: None)
    assert result.best.plan_obj == plan and len(result.probes) == 1
    assert "2/shard not compiled" in "\n".join(table.results_table([result]))


def test_splash_kernels_count_as_causal_attention_matmuls_and_other_kernels_as_opaque():
    # Query [heads=4, T=256, D=16] per call, inside a 2-layer loop (trip count from the condition).
    text = """HloModule m

%body (p: (s32[], f32[4,256,16])) -> (s32[], f32[4,256,16]) {
  %p = (s32[], f32[4,256,16]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %q = f32[4,256,16]{2,1,0} get-tuple-element(%p), index=1
  %flag = s8[1,1,1]{2,1,0} constant({...})
  %splash_mha_fwd_segmented_residuals.1 = (f32[4,256,16]{2,1,0}) custom-call(%flag, %q, %q, %q), custom_call_target="tpu_custom_call"
  %splash_mha_dq_segmented_no_residuals.1 = (f32[4,256,16]{2,1,0}) custom-call(%flag, %q, %q, %q), custom_call_target="tpu_custom_call"
  %splash_mha_dkv_segmented_no_residuals.1 = (f32[4,256,16]{2,1,0}) custom-call(%flag, %q, %q, %q), custom_call_target="tpu_custom_call"
  %other_kernel = f32[4,256,16]{2,1,0} custom-call(%q), custom_call_target="tpu_custom_call"
  %buffer = f32[4,256,16]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"
  ROOT %t = (s32[], f32[4,256,16]{2,1,0}) tuple(%i, %q)
}

%cond (p.1: (s32[], f32[4,256,16])) -> pred[] {
  %p.1 = (s32[], f32[4,256,16]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(2)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[4,256,16]) -> (s32[], f32[4,256,16]) {
  %a = f32[4,256,16]{2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,256,16]{2,1,0}) tuple(%zero, %a)
  ROOT %w = (s32[], f32[4,256,16]{2,1,0}) while(%init), condition=%cond, body=%body
}
"""
    cost = hlo.step_cost(text, num_devices=4)
    per_matmul = 4 * 256 * 16 * 256  # E·T: 2·E·T for a full T×T matmul, halved by the causal mask
    assert cost.flops == 2 * (2 + 3 + 4) * per_matmul
    assert cost.opaque_calls == 2  # the other Pallas kernel, twice; AllocateBuffer is bookkeeping


def test_head_axis_convolutions_and_in_place_stack_updates_are_not_overcounted():
    # XLA:TPU writes x[T,D] · Wq[D,N,H] as a convolution over N as a padded "spatial" axis of an input
    # of spatial size 1: one tap per output lands on data (not N). A scan's write of one layer's
    # activations into a stacked [L,T,F] buffer moves the slot, not the stack.
    text = """HloModule m

%fused_update (s: bf16[8,16,64], u: bf16[16,64], i: s32[]) -> bf16[8,16,64] {
  %s = bf16[8,16,64]{2,1,0} parameter(0)
  %u = bf16[16,64]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %u3 = bf16[1,16,64]{2,1,0} bitcast(%u)
  %z = s32[] constant(0)
  ROOT %dus = bf16[8,16,64]{2,1,0} dynamic-update-slice(%s, %u3, %i, %z, %z)
}

ENTRY %main (x: bf16[64,16,1], w: bf16[64,4,8], s: bf16[8,16,64], u: bf16[16,64], i: s32[]) -> (bf16[16,4,8], bf16[8,16,64]) {
  %x = bf16[64,16,1]{1,0,2} parameter(0)
  %w = bf16[64,4,8]{2,1,0} parameter(1)
  %s = bf16[8,16,64]{2,1,0} parameter(2)
  %u = bf16[16,64]{1,0} parameter(3)
  %i = s32[] parameter(4)
  %q = bf16[16,4,8]{2,1,0} convolution(%x, %w), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=fb0_i0o->b0f
  %stack = bf16[8,16,64]{2,1,0} fusion(%s, %u, %i), kind=kLoop, calls=%fused_update
  ROOT %t = (bf16[16,4,8]{2,1,0}, bf16[8,16,64]{2,1,0}) tuple(%q, %stack)
}
"""
    cost = hlo.step_cost(text, num_devices=1)
    assert cost.flops == 2 * (16 * 4 * 8) * 64          # one tap of the 4-wide window per output
    slot = 16 * 64 * 2
    convolution = (64 * 16 + 64 * 4 * 8 + 16 * 4 * 8) * 2
    assert cost.hbm_bytes == convolution + slot + slot + 4   # the update and the s32 index read, the slot written


def test_when_no_batch_fits_the_search_splits_the_heads_over_more_chips(tmp_path):
    """A probe log where one sequence fits at no remat with fsdp=4 tensor=1, but does at fsdp=2 tensor=2:
    the case's plan is the second split (the v6e 7B case: a mesh the config names is not the one that fits)."""
    config = sweep.load_config("experiments/tiny.py")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    case = sweep.Case("tiny", "experiments/tiny.py", "v5e:2x2")
    base = sweep.config_plan(config, 4, "xla", exact=False)
    assert sweep.mesh_splits(base.mesh, kv_heads=4) == [(1, 4, 1), (1, 2, 2), (1, 1, 4)]
    assert sweep.mesh_splits((1, 64, 4), kv_heads=8) == [(1, 64, 4), (1, 32, 8)]  # 34B: 8 kv heads
    limit = 16 * aot.GiB
    cache = sweep.ProbeCache(str(tmp_path / "probes.jsonl"))
    put = lambda plan, fits: cache.put(sweep.Probe(case.key, case.topology, dataclasses.asdict(plan), fits, limit,
                                                   (limit // 2) if fits else 0, 0 if fits else 2 * limit))
    for remat in (base.remat, "full"):
        put(dataclasses.replace(base, remat=remat, batch_per_shard=1, microbatches=1), False)
    split = dataclasses.replace(base, mesh=(1, 2, 2), batch_per_shard=1, microbatches=1)
    put(split, True)
    put(dataclasses.replace(split, batch_per_shard=2), False)
    result = sweep.sweep_case(case, attention="xla", remats=["full"], cache=sweep.ProbeCache(cache.path),
                              compile=False, config=config, log=lambda s: None)
    assert result.best.plan_obj == split
    assert result.remat_tried == [base.remat, "full", "tensor=2:", base.remat]
    from chameleon_jax.aot import table
    assert "at data=1 fsdp=4 tensor=1 one sequence fit at no remat" in "\n".join(table.results_table([result]))


def test_a_mesh_axis_that_splits_a_torus_ring_is_built_on_v6e():
    """tensor=8 on a 4x4 v6e is no product of whole torus axes (4, 4): the mesh takes neighbouring
    groups of one ring instead of failing (jax.make_mesh splits rings on v5e only)."""
    from chameleon_jax.model import sharding as shd
    import ml_collections
    devices = aot.topology_devices("v6e:4x4")
    mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=8, slices=1, dcn_axis="data")),
                         devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 8}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_a_logged_probe_of_one_more_sequence_settles_the_boundary_after_the_search_stopped(tmp_path):
    from chameleon_jax.aot import table
    config = sweep.load_config("experiments/tiny.py")
    case = sweep.Case("tiny", "experiments/tiny.py", "v5e:2x2")
    limit = 16 * aot.GiB
    plan = dataclasses.replace(sweep.config_plan(config, 4, "xla"), batch_per_shard=1, microbatches=1)
    cache = sweep.ProbeCache(str(tmp_path / "probes.jsonl"))
    cache.put(sweep.Probe(case.key, case.topology, dataclasses.asdict(plan), True, limit, 2 * aot.GiB))
    cache.put(sweep.Probe(case.key, case.topology, dataclasses.asdict(dataclasses.replace(plan, batch_per_shard=2)),
                          False, limit, 0, 20 * aot.GiB))
    result = sweep.sweep_case(case, attention="xla", cache=sweep.ProbeCache(cache.path), compile=False,
                              config=config, log=lambda s: None, max_probes=1)
    assert result.best.plan_obj == plan
    assert "largest fit; 2/shard compiled and does not fit" in "\n".join(table.results_table([result]))
