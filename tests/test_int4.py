"""4-bit weights (msrnn.quantize, quantize="int4"): llama.cpp's Q4_1 blocks (and Q8_0 for the LM
head), found back exactly from a checkpoint converted from a Q4_1 GGUF; the int4 and int8 steps
against a float64 model of the same dequantized weights, eager and compiled, on three families;
the compiled loop reading 4-bit codes; bad input."""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import msrnn
from msrnn.checkpoint import convert
from msrnn.cli import main
from msrnn.model import Linear
from msrnn.policies import TOVA, Full
from msrnn.quantize import GroupLinear, Int8Linear, q4_1, q8_0
from test_convert import to_llama_cpp
from tiny import save, save_char_tokenizer, tiny_hf

STEPS = 40


# ----------------------------------------------------------------------------- the formats

def test_q4_1_rounds_each_group_to_its_own_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 96, generator=g) * torch.tensor([1e-3, 1, 10, 3])[:, None]
    w[1, 32:64] = 0.25                                                   # a group of equal weights
    codes, d, m = q4_1(w)
    assert codes.shape == (4, 3, 16) and codes.dtype == torch.uint8
    assert d.shape == m.shape == (4, 3) and d.dtype == m.dtype == torch.float16
    assert d[1, 1] == 0 and m[1, 1] == 0.25 and not codes[1, 1].any()
    q = torch.cat([codes & 15, codes >> 4], -1).float()                 # [4, 3, 32]: 0..15
    groups = w.view(4, 3, 32)
    assert torch.equal(m.float(), groups.amin(-1).half().float())
    assert (q.amin(-1) == 0).all() and (q.amax(-1)[d > 0] == 15).all()
    err = (d.float()[..., None] * q + m.float()[..., None] - groups).abs()
    bound = d.float()[..., None] / 2 + (groups.amin(-1, keepdim=True) - m.float()[..., None]).abs()
    assert (err <= bound * (1 + 1e-3) + 1e-7).all()
    layer = GroupLinear(w)
    assert not layer.exact                                   # random floats: not on a grid...
    again = GroupLinear(layer.dequantized())                 # ...but its dequantization is
    assert again.exact and torch.equal(again.codes, layer.codes)
    assert torch.equal(again.d, layer.d) and torch.equal(again.m, layer.m)


def test_q8_0_is_symmetric_per_group():
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    codes, d = q8_0(w)
    assert codes.dtype == torch.int8 and codes.shape == (3, 2, 32) and d.shape == (3, 2)
    assert (codes.abs().amax(-1) == 127).all()
    err = (d.float()[..., None] * codes.float() - w.view(3, 2, 32)).abs()
    assert (err <= d.float()[..., None] * 0.51).all()
    again = GroupLinear(GroupLinear(w, bits=8).dequantized(), bits=8)
    assert again.exact and torch.equal(again.codes, codes) and again.m is None


# ----------------------------------------------------------------------------- a Q4_1 GGUF

def write_q4_1_gguf(hf, path):
    """A tiny LLaMA as llama.cpp's converter and quantizer would write it: q and k rows
    permuted, every projection Q4_1, the (tied) embedding Q8_0, norms float32."""
    import gguf

    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    tokens = [chr(0x41 + i) for i in range(c.vocab_size - 1)] + ["AB"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_merges(["A B"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)

    def add(name, w, kind):
        w = w.detach().float().numpy()
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    Q4_1, Q8_0, F32 = (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0,
                       gguf.GGMLQuantizationType.F32)
    add("token_embd.weight", hf.model.embed_tokens.weight, Q8_0)
    add("output_norm.weight", hf.model.norm.weight, F32)
    for i, layer in enumerate(hf.model.layers):
        a, mlp = layer.self_attn, layer.mlp
        q = to_llama_cpp(a.q_proj.weight.detach().numpy(), c.num_attention_heads)
        k = to_llama_cpp(a.k_proj.weight.detach().numpy(), c.num_key_value_heads)
        for key, w, kind in [("attn_q", torch.from_numpy(q), Q4_1),
                             ("attn_k", torch.from_numpy(k), Q4_1),
                             ("attn_v", a.v_proj.weight, Q4_1),
                             ("attn_output", a.o_proj.weight, Q4_1),
                             ("ffn_gate", mlp.gate_proj.weight, Q4_1),
                             ("ffn_up", mlp.up_proj.weight, Q4_1),
                             ("ffn_down", mlp.down_proj.weight, Q4_1),
                             ("attn_norm", layer.input_layernorm.weight, F32),
                             ("ffn_norm", layer.post_attention_layernorm.weight, F32)]:
            add(f"blk.{i}.{key}.weight", w, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def gguf_blocks(reader, name: str, n_heads: int | None = None):
    """A Q4_1 (or Q8_0) tensor's own blocks as (codes, d, m), rows in Hugging Face's order."""
    import gguf

    t = next(t for t in reader.tensors if t.name == name)
    raw = np.asarray(t.data)                                   # [out, G * block bytes]
    if n_heads is not None:
        raw = convert.unpermute(raw, n_heads)
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:        # d, then 32 int8 codes
        blocks = torch.from_numpy(raw.copy()).view(raw.shape[0], -1, 34)
        return blocks[..., 2:].view(torch.int8), blocks[..., :2].view(torch.float16)[..., 0], None
    blocks = torch.from_numpy(raw.copy()).view(raw.shape[0], -1, 20)   # d, m, 16 code bytes
    halves = blocks[..., :4].view(torch.float16)
    return blocks[..., 4:], halves[..., 0], halves[..., 1]


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory):
    """(the converted directory, the GGUF reader) of a tiny tied LLaMA written as Q4_1."""
    import gguf

    folder = tmp_path_factory.mktemp("q4_1")
    path = write_q4_1_gguf(tiny_hf("llama", tie_word_embeddings=True), folder / "tiny.gguf")
    return convert.convert_gguf(path, str(folder / "converted")), gguf.GGUFReader(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_of_a_q4_1_gguf_keeps_its_own_blocks(from_gguf, dtype):
    """The converted checkpoint holds the GGUF dequantized to float32; int4 finds the GGUF's
    own codes, scales and minima back (the head: its Q8_0 blocks), even for a bfloat16 model,
    and their dequantization equals the checkpoint's floats bit for bit."""
    directory, reader = from_gguf
    model = msrnn.load(directory, dtype=dtype, quantize="int4")
    floats = msrnn.load(directory)
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        stacked = {"attn.wqkv": [("attn_q", cfg.n_heads), ("attn_k", cfg.n_kv_heads),
                                 ("attn_v", None)],
                   "attn.wo": [("attn_output", None)],
                   "mlp.w13": [("ffn_gate", None), ("ffn_up", None)],
                   "mlp.w2": [("ffn_down", None)]}
        for path, sources in stacked.items():
            layer = block.get_submodule(path)
            parts = [gguf_blocks(reader, f"blk.{i}.{key}.weight", heads) for key, heads in sources]
            assert layer.exact and layer.bits == 4
            assert torch.equal(layer.codes, torch.cat([p[0] for p in parts]))
            assert layer.d.dtype == torch.float32                # widened, exactly
            assert torch.equal(layer.d.half().view(torch.int16), torch.cat([p[1] for p in parts])
                               .view(torch.int16))
            assert torch.equal(layer.m.view(torch.int16), torch.cat([p[2] for p in parts])
                               .view(torch.int16))
            assert torch.equal(layer.dequantized(), floats.get_submodule(
                f"blocks.{i}.{path}").weight)
    codes, d, _ = gguf_blocks(reader, "token_embd.weight")
    head = model.lm_head
    assert head.exact and head.bits == 8 and head.m is None
    assert torch.equal(head.codes, codes) and torch.equal(head.d.half().view(torch.int16),
                                                          d.view(torch.int16))
    assert torch.equal(head.dequantized(), floats.embed.weight)
    assert model.embed.weight.dtype == dtype and head.d.dtype == torch.float32


def test_int4_of_a_q4_1_gguf_has_the_float_models_logits(from_gguf):
    """Its weights are the float32 model's, so eager logits are equal, not just close."""
    directory, _ = from_gguf
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(msrnn.load(directory, quantize="int4")(ids), msrnn.load(directory)(ids))
    model, floats = msrnn.load(directory, quantize="int4"), msrnn.load(directory)
    assert torch.equal(steps(model, TOVA(8), ids)[0], steps(floats, TOVA(8), ids)[0])


# ----------------------------------------------------------------------------- the step

@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"int4-{request.param}")
    return save(tiny_hf(request.param, tie_word_embeddings=request.param == "llama"), directory)


def weights(layer) -> torch.Tensor:
    """A quantized projection's matrix as the step sees it, in float64."""
    if isinstance(layer, GroupLinear):
        return layer.dequantized().double()
    return layer.weight.double() * layer.scale.double()[:, None]


def dequantized_reference(directory, model):
    """The float64 model whose every projection (and LM head) is `model`'s dequantized."""
    ref = msrnn.load(directory, dtype=torch.float64)
    for ours, theirs in zip(model.blocks, ref.blocks):
        for path in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2"):
            theirs.get_submodule(path).weight.copy_(weights(ours.get_submodule(path)))
    ref.lm_head = Linear(ref.cfg.dim, ref.cfg.vocab_size).double()
    ref.lm_head.weight.data = weights(model.lm_head)
    return ref


def steps(model, policy, ids):
    state = model.init_state(ids.shape[0], policy, capacity=ids.shape[1])
    with torch.inference_mode():
        logits = torch.stack([model.step(ids[:, t], state)[0] for t in range(ids.shape[1])], 1)
    return logits, state


def same_evictions(state, state_ref):
    return all(torch.equal(state.positions(layer), state_ref.positions(layer))
               for layer in range(len(state.layers)))


def test_int4_step_equals_float64_of_the_same_weights(checkpoint):
    """Every projection Q4_1, the LM head Q8_0 (a tied head its own copy), the embedding in
    float: the eager step (batch 2) and a prompt pass equal a float64 model of the dequantized
    weights up to float32 rounding, with the same evictions; and int4 is close to float."""
    model = msrnn.load(checkpoint, quantize="int4")
    assert all(isinstance(model.blocks[i].get_submodule(p), GroupLinear) for i in range(2)
               for p in ("attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2"))
    assert model.lm_head.bits == 8 and model.embed.weight.dtype == torch.float32
    ref = dequantized_reference(checkpoint, model)
    ids = torch.randint(0, 128, (2, STEPS), generator=torch.Generator().manual_seed(0))
    for policy in (Full(), TOVA(12)):
        got, state = steps(model, policy, ids)
        expected, state_ref = steps(ref, policy, ids)
        assert (got.double() - expected).abs().max() < 1e-4
        assert same_evictions(state, state_ref)
    with torch.inference_mode():
        assert (model(ids).double() - ref(ids)).abs().max() < 1e-4
    # ... and close to the float model, not equal: 16 levels a group of random weights
    float_logits, _ = steps(msrnn.load(checkpoint), Full(), ids)
    diff = (float_logits - steps(model, Full(), ids)[0]).abs().max()
    assert 0 < diff < 0.2 * float_logits.abs().max()


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_compiled_quantized_step_equals_float64_of_the_same_weights(checkpoint, kind):
    """Batch 1 compiled (inductor's own loop over the codes), TOVA evicting: the same logits
    as the float64 model of the dequantized weights, and the same evictions."""
    model = msrnn.load(checkpoint, quantize=kind)
    ref = dequantized_reference(checkpoint, model)
    compiled = model.compile_step()
    ids = torch.randint(0, 128, (1, STEPS), generator=torch.Generator().manual_seed(4))
    torch._dynamo.reset()
    got, state = steps(compiled, TOVA(12), ids)
    expected, state_ref = steps(ref, TOVA(12), ids)
    assert (got.double() - expected).abs().max() < 1e-4
    assert same_evictions(state, state_ref)


def test_compiled_int4_step_streams_4_bit_codes_in_one_graph(tmp_path):
    """One graph, never recompiled, equal to the eager int4 step; the generated code reads the
    code bytes in its own loops (no library product, no float copy of a weight matrix)."""
    from torch._inductor.utils import run_and_get_code

    directory = save(tiny_hf("llama", tie_word_embeddings=True), tmp_path)
    model = msrnn.load(directory, quantize="int4")
    compiled = msrnn.load(directory, quantize="int4").compile_step()
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
    assert "Vectorized<uint8_t>::loadu" in code and "Vectorized<int8_t>::loadu" in code  # Q8_0 head
    assert "convert<int32_t>" in code     # each code byte widened once, then its nibbles
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    for layer in (m for m in compiled.model.modules() if isinstance(m, GroupLinear)):
        out, n_in = layer.shape                 # no buffer the size of a weight matrix
        for shape in (f"({out}, {n_in})", f"(1, {out}, {n_in})", f"({out}, {n_in // 32}, 32)",
                      f"(1, {out}, {n_in // 32}, 16)", f"(1, {out}, {n_in // 32}, 32)"):
            assert f"empty_strided_cpu({shape}" not in code


# ----------------------------------------------------------------------------- bad input

def test_int4_refuses_an_input_size_that_is_not_a_multiple_of_32(tmp_path, capsys):
    directory = save_char_tokenizer(save(tiny_hf("llama", intermediate_size=80), tmp_path))
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.w2 has 80 inputs, not a multiple of "
                                         r"32.*quantize='int8'"):
        msrnn.load(directory, quantize="int4")
    capsys.readouterr()
    assert main(["generate", directory, "--prompt", "abc", "--quantize", "int4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msrnn generate: error: quantize='int4': "
                                               "blocks.0.mlp.w2 has 80 inputs"), err


def test_cli_int4(tmp_path, capsys):
    directory = save_char_tokenizer(save(tiny_hf("qwen3"), tmp_path / "m"))
    capsys.readouterr()
    args = ["generate", directory, "--prompt", "abcdefgh", "--policy", "tova", "--size", "6",
            "--max-new-tokens", "12", "--quantize", "int4"]
    assert main(args) == 0
    model = msrnn.load(directory, quantize="int4")
    tok = msrnn.load_tokenizer(directory)
    ids = msrnn.generate(model, torch.tensor([tok.encode("abcdefgh")]), TOVA(6),
                         max_new_tokens=12, eos_ids=tok.eos_ids)
    assert tok.decode(ids[0].tolist()) in capsys.readouterr().out
    assert main(args + ["--backend", "transformers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quantize int4 quantizes msrnn's own decoder" in err[0]
    with pytest.raises(ValueError, match="already quantized"):
        msrnn.quantize.quantize(model, "int4")
    assert isinstance(msrnn.load(directory, quantize="int8").lm_head, Int8Linear)
