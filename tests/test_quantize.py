"""Weight-only int8 (msrnn.quantize): the rounding, the int8 step against a float64 model of the
same quantized weights, the compiled step streaming int8 bytes, and the command line."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import msrnn
from msrnn.cli import main
from msrnn.policies import TOVA, Full
from msrnn.quantize import Int8Linear, int8_rows, quantize, quantized
from tiny import save, save_char_tokenizer, tiny_hf

STEPS = 40


def test_int8_rows_round_to_the_nearest_step_of_each_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g) * torch.tensor([1e-3, 1, 10, 0, 5, 2])[:, None]
    q, s = int8_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(s[3], torch.tensor(1.0)) and not q[3].any()          # an all-zero row
    rows = [0, 1, 2, 4, 5]
    assert torch.equal(q[rows].abs().amax(1), torch.full((5,), 127, dtype=torch.int8))
    assert torch.allclose(s[rows], w[rows].abs().amax(1) / 127)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"int8-{request.param}")
    model = tiny_hf(request.param, tie_word_embeddings=request.param == "llama")
    return save(model, directory)


def dequantized_reference(directory, int8_model):
    """The float64 model whose every projection is Q * s of `int8_model`: what the int8 step
    computes, with no rounding but float64's."""
    ref = msrnn.load(directory, dtype=torch.float64)
    pairs = [(ref.blocks[i].attn, int8_model.blocks[i].attn, ("wqkv", "wo"))
             for i in range(len(ref.blocks))]
    pairs += [(ref.blocks[i].mlp, int8_model.blocks[i].mlp, ("w13", "w2"))
              for i in range(len(ref.blocks))]
    for a, b, names in pairs:
        for name in names:
            q = getattr(b, name)
            getattr(a, name).weight.copy_(q.weight.double() * q.scale.double()[:, None])
    head = int8_model.lm_head
    ref.lm_head = msrnn.model.Linear(ref.cfg.dim, ref.cfg.vocab_size).double()
    ref.lm_head.weight.data = head.weight.double() * head.scale.double()[:, None]
    return ref


def steps(model, policy, ids):
    state = model.init_state(ids.shape[0], policy, capacity=ids.shape[1])
    with torch.inference_mode():
        logits = torch.stack([model.step(ids[:, t], state)[0] for t in range(ids.shape[1])], 1)
    return logits, state


def test_int8_step_equals_float64_of_the_same_weights(checkpoint):
    """Every projection and the LM head int8 (a tied head gets its own copy), the embedding
    table in float: the step equals a float64 model of the dequantized weights up to float32
    rounding, with the same evictions."""
    model = msrnn.load(checkpoint, quantize="int8")
    assert quantized(model) and isinstance(model.lm_head, Int8Linear)
    assert model.embed.weight.dtype == torch.float32
    ref = dequantized_reference(checkpoint, model)
    ids = torch.randint(0, 128, (2, STEPS), generator=torch.Generator().manual_seed(0))
    for policy in (Full(), TOVA(12)):
        got, state = steps(model, policy, ids)
        expected, state_ref = steps(ref, policy, ids)
        assert (got.double() - expected).abs().max() < 1e-4
        for layer in range(len(state.layers)):
            assert torch.equal(state.positions(layer), state_ref.positions(layer))
    # ... and the int8 model is close to the float one (the rounding is small), not equal
    float_logits, _ = steps(msrnn.load(checkpoint), Full(), ids)
    diff = (float_logits - steps(model, Full(), ids)[0]).abs().max()
    assert 0 < diff < 0.05 * float_logits.abs().max()


def test_int8_prompt_and_bfloat16_rows_use_the_library_kernels(checkpoint):
    """Several rows: a prompt pass, and bfloat16 activations (PyTorch's int8 weight-only matrix
    product): both equal the float64 reference, float32 tightly and bfloat16 to its precision."""
    model = msrnn.load(checkpoint, quantize="int8")
    ref = dequantized_reference(checkpoint, model)
    ids = torch.randint(0, 128, (2, STEPS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids)
        assert (model(ids).double() - expected).abs().max() < 1e-4
        bf16 = msrnn.load(checkpoint, dtype=torch.bfloat16, quantize="int8")
        assert bf16.blocks[0].attn.wqkv.scale.dtype == torch.bfloat16
        err = (bf16(ids).double() - expected).abs().max()
    assert err < 0.05 * expected.abs().max(), err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save(tiny_hf("llama", tie_word_embeddings=True), tmp_path_factory.mktemp("int8"))


def test_compiled_int8_step_streams_int8_in_one_graph(llama):
    """Batch 1 compiled: one graph, never recompiled, equal to the eager int8 step; the
    generated code reads the int8 weights in its own loops (no library product, no float copy
    of a weight matrix)."""
    from torch._inductor.utils import run_and_get_code

    model = msrnn.load(llama, quantize="int8")
    compiled = msrnn.load(llama, quantize="int8").compile_step()
    ids = torch.randint(0, 128, (1, STEPS), generator=torch.Generator().manual_seed(2))
    expected, _ = steps(model, TOVA(12), ids)
    torch._dynamo.reset()
    counters.clear()
    state = compiled.init_state(1, TOVA(12))
    with torch.inference_mode():
        first, code = run_and_get_code(compiled.step, ids[:, 0], state)
        assert counters["stats"]["unique_graphs"] == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            rest = [compiled.step(ids[:, t], state)[0] for t in range(1, STEPS)]
    got = torch.stack([first[0]] + rest, 1)
    assert (got - expected).abs().max() < 1e-5
    code = "\n".join(code)
    assert "Vectorized<int8_t>::loadu" in code
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    shapes = {tuple(m.weight.shape) for m in compiled.model.modules() if isinstance(m, Int8Linear)}
    for out, n_in in shapes:                    # no buffer the size of a weight matrix
        assert f"empty_strided_cpu(({out}, {n_in})" not in code
        assert f"empty_strided_cpu((1, {out}, {n_in})" not in code


def test_quantize_refuses_bad_requests(checkpoint):
    with pytest.raises(ValueError, match="quantize=.int2.*int8, int4"):
        msrnn.load(checkpoint, quantize="int2")
    model = msrnn.load(checkpoint, quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model)


def test_cli_quantize(tmp_path, capsys):
    directory = save_char_tokenizer(save(tiny_hf("llama"), tmp_path / "m"))
    args = ["generate", directory, "--prompt", "abcdefgh", "--policy", "tova", "--size", "6",
            "--max-new-tokens", "12", "--quantize", "int8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    model = msrnn.load(directory, quantize="int8")
    tok = msrnn.load_tokenizer(directory)
    ids = msrnn.generate(model, torch.tensor([tok.encode("abcdefgh")]), TOVA(6),
                         max_new_tokens=12, eos_ids=tok.eos_ids)
    assert tok.decode(ids[0].tolist()) in text
    assert main(args + ["--compile"]) == 0
    assert tok.decode(ids[0].tolist()) in capsys.readouterr().out
    assert main(args + ["--backend", "transformers"]) == 2
    assert "--quantize int8 quantizes msrnn's own decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args[:-1] + ["int2"])
