"""MoQ training: DeepSpeed's JSON, configuration errors, overflowed steps, the per-layer
eigenvalues against explicit Hessians, and export -> init_inference round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dsjax
from dsjax.config import ModelConfig
from dsjax.model import abstract_model, unflatten
from dsjax.quant import QuantizedWeight
from dsjax.quant.moq import BitSchedule, EigenvalueSchedule, MoQConfig
from dsjax.quant.train import (MoQTrainer, layer_eigenvalues, next_token_loss,
                               parse_deepspeed_config, weight_plan)


def tiny(**overrides) -> ModelConfig:
    cfg = dict(family="tiny", vocab_size=16, hidden_size=16, num_layers=2, num_heads=2,
               intermediate_size=32, max_position_embeddings=16)  # GPT-2's kind of block
    return ModelConfig(**{**cfg, **overrides})


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> dict:
    """Normal weights (norm scales too) made by numpy: no per-config compile."""
    rng = np.random.default_rng(seed)
    shapes = abstract_model(cfg)[1]
    return unflatten({k: jnp.asarray(rng.normal(0, std, s.shape), jnp.float32)
                      for k, s in shapes.items()})


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 12)), jnp.int32)

# a quantize_training block as DeepSpeed's MoQ tutorial writes it, verbatim
SEED = {"quantize_training": {
    "enabled": True, "quantize_verbose": True, "quantizer_kernel": True,
    "quantize_type": "symmetric", "quantize_bits": {"start_bits": 12, "target_bits": 8},
    "quantize_schedule": {"quantize_period": 10, "schedule_offset": 0}, "quantize_groups": 8,
    "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001},
    "eigenvalue": {"enabled": True, "verbose": True, "max_iter": 50, "tol": 1e-2, "stability": 0,
                   "gas_boundary_resolution": 1, "layer_name": "bert.encoder.layer",
                   "layer_num": 12}}}


def test_the_seeds_quantize_training_block():
    assert parse_deepspeed_config(SEED) == MoQConfig(
        (BitSchedule(12, 8, 10),), schedule_offset=0, quantize_groups=8, verbose=True,
        eigenvalue=EigenvalueSchedule(max_iter=50, tol=1e-2, stability=0, layer_num=12))


def test_compression_training_groups_pick_weights_by_module():
    ds = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 5, "quantize_groups": 2,
                              "quantization_type": "asymmetric", "rounding": "stochastic",
                              "fp16_mixed_quantize": {"enabled": True,
                                                      "quantize_change_ratio": 0.01}},
        "different_groups": {
            "wq1": {"params": {"start_bits": 12, "target_bits": 8, "quantization_period": 50},
                    "modules": ["attn.qkv", "mlp.up"]},
            "wq2": {"params": {"start_bits": 6, "target_bits": 4}, "modules": ["attn.out"]}}}}}
    cfg = parse_deepspeed_config(ds)
    assert (cfg.schedule_offset, cfg.quantize_groups, cfg.symmetric, cfg.stochastic,
            cfg.mix_change_ratio) == (5, 2, False, True, 0.01)
    shapes = {"layers.0.attn.qkv.kernel": (16, 48), "layers.0.attn.out.kernel": (16, 16),
              "layers.0.mlp.up.kernel": (16, 32), "layers.0.mlp.down.kernel": (32, 16)}
    plan = {p.path: p.schedule for p in weight_plan(cfg, shapes)}
    assert plan == {"layers.0.attn.qkv.kernel": BitSchedule(12, 8, 50, ("attn.qkv", "mlp.up")),
                    "layers.0.mlp.up.kernel": BitSchedule(12, 8, 50, ("attn.qkv", "mlp.up")),
                    "layers.0.attn.out.kernel": BitSchedule(6, 4, 1, ("attn.out",))}


def _qt(**block):
    return {"quantize_training": {"enabled": True, **block}}


@pytest.mark.parametrize("ds,match", [
    (_qt(quantize_bits={"start_bits": 8, "target_bits": 12}), "above start_bits"),
    (_qt(quantize_bits={"start_bits": 8, "target_bits": 0}), "target_bits must be >= 1"),
    (_qt(quantize_bits={"start_bits": 8}), "target_bits is required"),
    (_qt(quantize_bits={"target_bits": 8}, **{"quantize-algo": {"q_type": "symmetric"}}),
     "'quantize-algo' belongs at 'quantize_algo'"),
    (_qt(quantize_bits={"target_bits": 8}, quantize_schedule={"period": 10}),
     r"unknown keys \['period'\] in quantize_training.quantize_schedule"),
    (_qt(quantize_bits={"target_bits": 8}, quantize_type="symmetric",
         quantize_algo={"q_type": "asymmetric"}), "disagree"),
    (_qt(quantize_bits={"target_bits": 8}, quantize_algo={"rounding": "floor"}),
     "choose one of 'nearest', 'stochastic'"),
    (_qt(quantize_bits={"start_bits": 4, "target_bits": 2}, quantize_algo={"q_type": "asymmetric"}),
     "ternary"),
    (_qt(quantize_bits={"target_bits": 8}, quantize_schedule={"quantize_period": 0}),
     "quantize_period must be >= 1"),
    ({"compression_training": {"weight_quantization": {"shared_parameters": {
        "enabled": True, "quantize_weight_in_forward": True}}}}, "quantize_weight_in_forward"),
    ({"compression_training": {"sparse_pruning": {"shared_parameters": {"enabled": True}}}},
     "sparse_pruning is not supported"),
    ({"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True},
        "different_groups": {"g": {"params": {"start_bits": 8}}}}}}, r"needs \['target_bits'\]"),
    ({"optimizer": {"type": "Adam"}}, "exactly one of"),
])
def test_bad_deepspeed_configs_say_what_to_fix(ds, match):
    with pytest.raises(ValueError, match=match):
        parse_deepspeed_config(ds)


def test_disabled_block_means_no_moq():
    assert parse_deepspeed_config({"quantize_training": {"enabled": False}}) is None


def _moq(start=10, target=8, period=2, **kw) -> MoQConfig:
    return MoQConfig((BitSchedule(start, target, period, kw.pop("modules", ("*",))),), **kw)


@pytest.mark.parametrize("moq,steps,cfg,match", [
    (_moq(12, 8, 10), 79, tiny(), r"last at step schedule_offset \+ period \* 2\^3 = 80 > 79 "
                                  r"training steps: use quantize_period <= 9"),
    (_moq(schedule_offset=5), 8, tiny(), "= 9 > 8 training steps: use quantize_period <= 1"),
    (_moq(quantize_groups=3), 50, tiny(), "quantize_groups=3 must divide its 16 output columns"),
    (_moq(modules=("attention.self",)), 50, tiny(), "match no quantizable weight"),
    (MoQConfig((BitSchedule(10, 8, 2, ("qkv",)), BitSchedule(10, 8, 2, ("attn",)))), 50, tiny(),
     "in 2 weight-quantization groups"),
    (_moq(eigenvalue=EigenvalueSchedule(layer_num=3)), 50, tiny(), "layer_num=3 exceeds"),
    (_moq(group_size=3), 50, tiny(), "divide"),
    (_moq(6, 4, group_size=8), 50, tiny(hidden_size=24), "does not divide K/2=12"),
])
def test_bad_training_configs_fail_before_training(moq, steps, cfg, match):
    with pytest.raises(ValueError, match=match):
        MoQTrainer(cfg, moq, optax.sgd(0.1), num_steps=steps)


def test_export_needs_a_servable_target_reached():
    trainer = MoQTrainer(tiny(), _moq(4, 2, 2), optax.sgd(0.1), num_steps=10)
    with pytest.raises(ValueError, match="8 or 4 bits; this MoQ config targets \\[2\\]"):
        trainer.export(trainer.init(init_params(tiny())))
    trainer = MoQTrainer(tiny(), _moq(10, 8, 2), optax.sgd(0.1), num_steps=10)
    state = trainer.init(init_params(tiny()))
    with pytest.raises(ValueError, match="8 weights have not reached 8 bits yet .* at 10"):
        trainer.export(state)


def _scaled_loss(model, batch):
    return next_token_loss(model, batch["tokens"]) * batch["scale"]


@pytest.fixture(scope="module")
def int4_trainer():
    """4-bit asymmetric, 2 column groups, row groups of 4: every part of the export format."""
    moq = _moq(6, 4, 2, symmetric=False, quantize_groups=2, group_size=4)
    return MoQTrainer(tiny(), moq, optax.adam(1e-2), num_steps=12, loss_fn=_scaled_loss)


def test_an_overflowed_step_is_skipped_and_not_counted(int4_trainer):
    state = int4_trainer.init(init_params(tiny()))
    for scale in (1.0, np.nan):
        before = jax.tree.map(np.asarray, state.params)
        state, _ = int4_trainer.step(state, {"tokens": TOKENS, "scale": jnp.float32(scale)})
    after = jax.tree.map(np.asarray, state.params)
    pairs = zip(jax.tree.leaves(after), jax.tree.leaves(before))
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert int(state.step) == 2 and int(state.schedule.steps) == 1


def test_export_round_trip_serves_the_fake_quantized_model(int4_trainer, tmp_path):
    trainer, batch = int4_trainer, {"tokens": TOKENS, "scale": jnp.float32(1)}
    state = trainer.init(init_params(tiny()))
    for _ in range(10):  # steps 2 and 4 are the first at 5 and 4 bits
        state, loss = trainer.step(state, batch)
    assert np.isfinite(float(loss))
    trainer.save(state, tmp_path / "moq")
    engine = dsjax.init_inference(tmp_path / "moq", dtype="fp32", progress=False)
    assert engine.inference_config.quant == trainer.export_spec()
    kernel = engine.params["layers"][1]["mlp"]["down"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and kernel.bits == 4 and kernel.group_size == 4

    @jax.jit
    def logits(params):
        model = trainer.model(params)
        return model.logits(model(TOKENS, jnp.broadcast_to(jnp.arange(12), TOKENS.shape))[0])

    expect = np.asarray(logits(trainer.forward_params(state)))  # the fake-quantized trained model
    np.testing.assert_allclose(np.asarray(engine(np.asarray(TOKENS))), expect, atol=2e-5)
    assert np.abs(np.asarray(logits(state.params)) - expect).max() > 1e-2  # it is quantized


def test_layer_eigenvalues_against_explicit_hessians():
    # two tanh layers and a head; each layer's own Hessian is a diagonal block of the full one
    normal = lambda seed, shape: jax.random.normal(jax.random.key(seed), shape)  # noqa: E731
    x, y = normal(0, (16, 3)), normal(1, (16, 2))
    params = {"layers": {i: {"w": normal(2 + i, (3, 3))} for i in (0, 1)}, "head": normal(5, (3, 2))}

    def loss_of(p):
        h = jnp.tanh(jnp.tanh(x @ p["layers"][0]["w"]) @ p["layers"][1]["w"])
        return jnp.mean((h @ p["head"] - y) ** 2)

    eigen = EigenvalueSchedule(max_iter=500, tol=1e-8)
    got = jax.jit(lambda p: layer_eigenvalues(loss_of, p, ["layers.0.", "layers.1."],
                                              jax.random.key(6), eigen))(params)
    both = lambda v: loss_of({"layers": {0: {"w": v[:9].reshape(3, 3)},  # noqa: E731
                                         1: {"w": v[9:].reshape(3, 3)}}, "head": params["head"]})
    vec = jnp.concatenate([params["layers"][i]["w"].ravel() for i in (0, 1)])
    hessian = np.asarray(jax.jit(jax.hessian(both))(vec), np.float64)
    for i, block in enumerate((hessian[:9, :9], hessian[9:, 9:])):
        eig = np.linalg.eigvalsh(block)
        np.testing.assert_allclose(float(got[i]), eig[np.argmax(np.abs(eig))], rtol=1e-3)


def test_the_eigenvalue_schedule_runs_inside_the_training_step():
    # P = 1: the drop before the first step (as DeepSpeed's at step 0, without eigenvalues) makes
    # the period 2; the first step's drop (to q = 2) is then due, so that step measures each
    # layer's top eigenvalue and stretches its next period to 2 * 2 * (1 + floor(4 |e| / max|e|))
    cfg = tiny(hidden_size=4, intermediate_size=4, vocab_size=8, num_heads=1, positions="none",
               activation="relu", qkv_bias=False, out_bias=False, mlp_bias=False)
    moq = _moq(10, 8, 1, eigenvalue=EigenvalueSchedule(max_iter=50))
    trainer = MoQTrainer(cfg, moq, optax.sgd(0.1), num_steps=10)
    state = trainer.init(init_params(cfg, std=0.5))
    assert {int(v) for v in jax.device_get(state.schedule.period).values()} == {2}
    state, _ = trainer.step(state, TOKENS % 8)
    eigenvalues = np.abs(np.asarray(state.eigenvalues))
    assert (eigenvalues > 0).all()
    factors = 1 + np.floor(4 * eigenvalues / eigenvalues.max())
    periods = jax.device_get(state.schedule.period)
    for layer in (0, 1):
        assert {int(periods[p]) for p in periods if p.startswith(f"layers.{layer}.")} == \
            {4 * int(factors[layer])}
    assert {int(v) for v in jax.device_get(state.schedule.bits).values()} == {8}
