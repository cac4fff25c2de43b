"""Partitioning on 8 simulated CPU devices: every mesh computes what one device computes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import MASKED, PARTITION, one_device, run_steps, tiny_config
from jaxlm import cli, mesh as mesh_lib, plan, state as state_lib, run as run_lib
from jaxlm.config import ConfigError


def mesh_config(**sizes):
  return tiny_config(**{f'mesh__{k}': v for k, v in sizes.items()}).mesh


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


@pytest.mark.parametrize('sizes,expected', [
    (dict(), dict(data=1, fsdp=8, sequence=1, tensor=1)),
    (dict(fsdp=1, data=-1), dict(data=8, fsdp=1, sequence=1, tensor=1)),
    (dict(tensor=2), dict(data=1, fsdp=4, sequence=1, tensor=2)),
    (dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=2, sequence=1, tensor=2)),
])
def test_minus_one_fills_the_remaining_devices(sizes, expected):
  ici, dcn = mesh_lib.mesh_shape(mesh_config(**sizes), 8)
  assert ici == expected and set(dcn.values()) == {1}


def test_cross_slice_axes_split_the_slices_and_in_slice_axes_the_rest():
  ici, dcn = mesh_lib.mesh_shape(mesh_config(tensor=4), 16, slices=2)
  assert dcn == dict(data=2, fsdp=1, sequence=1, tensor=1)  # dcn_data=-1 spans the slices.
  assert ici == dict(data=1, fsdp=2, sequence=1, tensor=4)


@pytest.mark.parametrize('sizes,slices,message', [
    (dict(fsdp=3), 1, 'mesh.* axes data=1xfsdp=3xsequence=1xtensor=1 make 3 devices, but '
                      'there are 8'),
    (dict(fsdp=-1, data=-1), 1, 'only one mesh.* axis may be -1, got data, fsdp'),
    (dict(tensor=3), 1, 'need a multiple of 3 devices, but there are 8'),
    (dict(dcn_data=3), 2, 'mesh.dcn_* axes'),
])
def test_meshes_that_do_not_fit_name_the_numbers(sizes, slices, message):
  with pytest.raises(ConfigError) as e:
    mesh_lib.mesh_shape(mesh_config(**sizes), 8, slices)
  assert message in str(e.value)


def test_cross_node_axes_need_as_many_processes():
  with pytest.raises(ConfigError, match='mesh.dcn_\\* axes data=2xfsdp=1xsequence=1xtensor=1 make '
                                        '2 devices, but there are 1'):
    mesh_lib.make_mesh(mesh_config(dcn_data=2), jax.devices())


# The sequence-parallel mesh also checks the model's dots over [batch, length, ...] against
# the [batch * length, ...] rows they use when the length is not sharded (layers.Dense).
MESHES = [dict(data=8, fsdp=1), dict(fsdp=8), dict(fsdp=1, tensor=8),
          dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2), dict(fsdp=4, sequence=2)]
# A masked LM (helpers.MASKED: BERT family, bidirectional, masks drawn on device) on two of
# the meshes.
CASES = [(sizes, 'causal') for sizes in MESHES] + [
    (dict(fsdp=8), 'masked'), (dict(data=2, fsdp=2, tensor=2), 'masked')]


@pytest.fixture(scope='module')
def single_device_runs():
  runs = {}
  for objective, overrides in (('causal', PARTITION), ('masked', MASKED)):
    _, state, losses = run_steps(tiny_config(**overrides), one_device())
    runs[objective] = jax.device_get(state.params), losses
  return runs


@pytest.mark.parametrize('sizes,objective', CASES, ids=lambda c: (
    ','.join(f'{k}={v}' for k, v in c.items()) if isinstance(c, dict) else c))
def test_every_mesh_trains_like_one_device(sizes, objective, single_device_runs):
  overrides = PARTITION if objective == 'causal' else MASKED
  config = tiny_config(**overrides, **{f'mesh__{k}': v for k, v in sizes.items()})
  s, state, losses = run_steps(config, jax.devices())
  expected_params, expected_losses = single_device_runs[objective]
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)),
                       jax.tree.leaves(expected_params)):  # Within 1e-5 relative, per tensor.
    # (The floor is for BERT's key biases: softmax ignores them, so their gradient is pure
    # rounding noise and they stay near zero.)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-6
  # Each parameter lives exactly where the rule table says.
  for name, shape, names, spec in state_lib.param_table(s.abstract, s.shardings):
    leaf = state.params
    for key in name.split('/'):
      leaf = leaf[key]
    assert leaf.sharding.spec == nn.logical_to_mesh_axes(names, s.rules), name
  assert state.opt_state[1][0].mu['token_embed']['embedding'].sharding.spec == (
      nn.logical_to_mesh_axes(('vocab', 'embed'), s.rules))


def test_parameter_memory_per_device_shrinks_as_fsdp_grows():
  sizes = []
  for fsdp in (1, 2, 4, 8):
    s = run_lib.setup(tiny_config(**PARTITION, mesh__fsdp=fsdp, mesh__data=-1), jax.devices())
    sizes.append(state_lib.bytes_per_device(s.abstract_state.params, s.shardings.params))
  assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
  assert sizes[3] < sizes[0] / 6  # Only small vectors (norm scales) stay partly replicated.


def test_a_dimension_that_does_not_split_is_refused():
  config = tiny_config(mesh__fsdp=1, mesh__tensor=8)  # 4 heads over 8 tensor devices.
  with pytest.raises(ConfigError, match=r'parameter layers/attention/key/bias dimension 1 '
                                        r'\(kv_heads\) of size 4 does not split over mesh '
                                        r"axes tensor of 8 devices"):
    run_lib.setup(config, jax.devices())


def test_a_batch_that_does_not_split_is_refused():
  config = tiny_config(batch_size=4, mesh__fsdp=8)
  with pytest.raises(ConfigError, match=r'batch_size=4 / optimizer.grad_accum_steps=1 = 4 '
                                        r"sequences do not split over the 8 devices"):
    run_lib.setup(config, jax.devices())


def test_plan_compiles_the_step_for_the_mesh(capsys):
  report = plan.run(tiny_config(**PARTITION, mesh__fsdp=4, mesh__tensor=2))
  out = capsys.readouterr().out
  assert 'data=1 x fsdp=4 x sequence=1 x tensor=2 (8 devices)' in out
  assert "layers/mlp/wi/kernel" in out and "(None, 'fsdp', 'tensor')" in out
  assert report['devices'] == 8 and report['step_bytes_per_device'] > 0
  assert report['flops_per_step'] == report['flops_per_token'] * 8 * 64


def test_plan_command_takes_the_mesh_from_the_command_line(capsys):
  assert cli.main(['plan', '--config=configs/gpt_tiny.py', '--config.mesh.tensor=2',
                   '--config.batch_size=8']) == 0
  assert 'fsdp=4 x sequence=1 x tensor=2' in capsys.readouterr().out
