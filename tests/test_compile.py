"""The compiled decode step computes what the eager step computes, in one graph, compiled once."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import msrnn
from msrnn.policies import H2O, TOVA, Full, KeyNorm, Sinks
from tiny import save, tiny_hf

STEPS = 60


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = save(tiny_hf("llama", num_attention_heads=6, num_key_value_heads=2,
                             hidden_size=48), tmp_path_factory.mktemp("compile"))
    return msrnn.load(directory), msrnn.load(directory).compile_step(), directory


def run(model, policy, ids, capacity=None):
    state = model.init_state(ids.shape[0], policy, capacity=capacity)
    logits = torch.stack([model.step(ids[:, t], state)[0] for t in range(ids.shape[1])], 1)
    return logits, state


# Batch 1 takes the compiled matrix-vector product (model.linear), a batch of several rows the
# library's matrix multiply.
@pytest.mark.parametrize("policy, batch", [(TOVA(16), 1), (TOVA(16), 2), (H2O(16), 2),
                                           (TOVA(16), 7),
                                           (TOVA(16, per_head=True, sinks=2), 1),
                                           (Sinks(12, sinks=3), 2), (KeyNorm(16), 1), (Full(), 1)], ids=repr)
def test_compiled_step_equals_eager_in_one_graph(models, policy, batch):
    eager, compiled, _ = models
    # No token twice in a row: KeyNorm's layer-0 scores of a repeated token tie up to rounding,
    # and the compiled step rounds differently.
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(128, generator=g)[:STEPS] for _ in range(batch)])
    expected, state_e = run(eager, policy, ids, capacity=STEPS)
    torch._dynamo.reset()
    counters.clear()
    got, state_c = run(compiled, policy, ids[:, :2], capacity=STEPS)    # compiles here, once
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    with torch._dynamo.config.patch(error_on_recompile=True):          # ... and never again
        rest = torch.stack([compiled.step(ids[:, t], state_c)[0] for t in range(2, STEPS)], 1)
    got = torch.cat([got, rest], 1)
    assert (got - expected).abs().max() < 1e-5
    for layer in range(len(state_e.layers)):
        assert torch.equal(state_c.positions(layer), state_e.positions(layer))


def test_compiled_generate_gives_the_eager_tokens(models):
    eager, compiled, _ = models
    prompt = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=40, eos_ids=set())
    a = msrnn.generate(eager, prompt, TOVA(8), **kwargs)
    b = msrnn.generate(compiled, prompt, TOVA(8), compile=True, **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [1, 3])          # the one-row loop, the library
def test_compiled_bfloat16_step_is_close_to_eager(models, batch):
    """bfloat16 rounds differently when compiled (products summed in float32 in another order),
    so the logits agree to bfloat16's precision rather than exactly."""
    directory = models[2]
    eager = msrnn.load(directory, dtype=torch.bfloat16)
    compiled = msrnn.load(directory, dtype=torch.bfloat16).compile_step()
    ids = torch.randint(0, 128, (batch, 24), generator=torch.Generator().manual_seed(2))
    expected, _ = run(eager, TOVA(16), ids)
    got, _ = run(compiled, TOVA(16), ids)
    assert got.dtype == torch.bfloat16
    err = (got.float() - expected.float()).abs().max()
    assert err <= 0.05 * expected.float().abs().max(), err


def test_cpp_wrapper_step_equals_eager(models):
    """wrapper="cpp": the same step, its kernels launched by inductor's C++ wrapper (the code it
    runs is one C++ entry point, not a Python function calling each kernel): the eager step's
    logits and evictions, in one graph."""
    from torch._inductor.utils import run_and_get_code

    eager, python, directory = models
    cpp = msrnn.load(directory).compile_step(wrapper="cpp")
    assert cpp.wrapper == "cpp" and cpp.compile_step(wrapper="cpp") is cpp
    assert cpp.compile_step() is not cpp and cpp.compile_step().wrapper == "python"
    ids = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:24][None]
    expected, state_e = run(eager, TOVA(8), ids)
    torch._dynamo.reset()
    counters.clear()
    state = cpp.init_state(1, TOVA(8))
    first, code = run_and_get_code(cpp.step, ids[:, 0], state)
    assert "void inductor_entry_impl(" in "\n".join(code)
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = [cpp.step(ids[:, t], state)[0] for t in range(1, ids.shape[1])]
    assert counters["stats"]["unique_graphs"] == 1
    got = torch.stack([first[0]] + rest, 1)
    assert (got - expected).abs().max() < 1e-5
    for layer in range(len(state.layers)):
        assert torch.equal(state.positions(layer), state_e.positions(layer))


def test_compile_refuses_an_unknown_wrapper_and_cpp_beside_a_mode(models):
    eager = models[0]
    with pytest.raises(ValueError, match=r"wrapper='java'.*'python' or 'cpp'"):
        eager.compile_step(wrapper="java")
    with pytest.raises(ValueError, match=r"wrapper='cpp' is for the CPU step.*CUDA graph"):
        msrnn.backend.Compiled(eager, mode="max-autotune", wrapper="cpp")
