"""msrnn as a model of EleutherAI's lm-evaluation-harness (`lm_eval`): `--model msrnn`.

Importing this module registers the class `MSRNNLM` under the name "msrnn" with lm-eval's
registry (`lm_eval.api.registry.register_model`), so that

    msrnn lm-eval --model msrnn --tasks niah_single_1 --metadata '{"max_seq_lengths": [1024]}' \\
        --model_args pretrained=SmolLM2-135M-Instruct,policy=tova,size=256
    lm_eval.simple_evaluate(model=msrnn.experiments.lmeval.MSRNNLM(policy="tova", size=256),
                            tasks=[...])

evaluate a bounded multi-state on any of lm-eval's tasks. The three request types
(docs/lm-eval.md):

    loglikelihood          log p(continuation | context), summed over the continuation's tokens,
                           and whether greedy decoding would have produced it. Full reads
                           context + continuation in one parallel pass (cut on the left to the
                           model's range, as lm-eval's `hf` model does). A bounded policy reads
                           the whole sequence: `sequential`, every token a step of the MSRNN
                           (msrnn.prompt); `oneshot`, the context as one prompt compressed once,
                           then the continuation's tokens as steps.
    loglikelihood_rolling  log p(document). Full: lm-eval's disjoint windows of the model's range
                           (what `hf` computes). A bounded policy: the whole document as one
                           sequence after the prefix token, past the range with positions `cache`
                           or `compressed`.
    generate_until         msrnn.generate's loop (greedy, or sampling with do_sample), until EOS,
                           a stop string or max_gen_toks.

A batch is ragged: each row runs its own prompt (rows of one length together), so padding never
enters a multi-state, and the rows then step together (msrnn.prompt.fill, msrnn.generate).
Every check (sizes, ranges) runs over all the requests of a call before the first one runs.
"""

import copy
import importlib.util
import logging
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

INSTALL = "lm-eval is not installed: pip install 'msrnn[lm-eval]'"
try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:                          # the extra was not installed
    raise ImportError(INSTALL) from e

from .. import policies
from ..generate import stream
from ..checkpoint.loading import DEFAULT_MODEL, resolve
from ..positions import Scheme, check_range
from ..prompt import Mode, fill, prefill
from ..checkpoint.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# The --model_args keys, and what each means (the error for an unknown key lists them).
KEYS = {
    "pretrained": "a checkpoint directory, a name in the model home or a Hub repo id",
    "policy": f"one of {', '.join(policies.NAMES)} (or one that policy_module registers)",
    "size": "the multi-state size k of a bounded policy",
    "sinks": "first tokens never evicted",
    "positions": "original, cache or compressed (msrnn.positions)",
    "prompt_mode": "oneshot or sequential (msrnn.prompt)",
    "observe": "TOVA's oneshot observation window w",
    "dtype": "float32, bfloat16, float16 or float64",
    "device": "cpu, cuda, cuda:N",
    "backend": "msrnn (msrnn's decoder) or transformers (msrnn.hf)",
    "quantize": "int8 or int4 (msrnn's decoder)",
    "policy_module": "a Python file that registers a policy (@policies.register)",
    "batch_size": "rows per batch",
    "max_batch_size": "lm-eval's, for batch_size=auto (unused)",
}
DTYPES = ("float32", "bfloat16", "float16", "float64")
LM_EVAL_DEVICE = "cuda:0"    # what lm-eval's command line passes when --device is not given
GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


class HarnessError(ValueError):
    """Bad model_args or requests this model cannot run: one line naming the fix."""


def import_policy_file(path: str):
    """Run a user's Python file once, so that the policies it defines with
    `@msrnn.policies.register("name", ...)` join the registry (docs/policies.md)."""
    if not os.path.isfile(path):
        raise HarnessError(f"policy_module={path}: no such file; give the path of a Python file "
                           f"that registers a policy with @msrnn.policies.register")
    name = "msrnn_policy_" + os.path.splitext(os.path.basename(path))[0]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise HarnessError(f"policy_module={path} failed to import ({type(e).__name__}: "
                           f"{e})") from None
    return module


def make_policy(name: str, size, sinks, observe) -> policies.Policy:
    """The policy model_args name, with model_args' words in the errors."""
    if name not in policies.REGISTRY:
        raise HarnessError(f"unknown policy={name}: choose one of {', '.join(policies.REGISTRY)}"
                           f" (or register one in a file given as policy_module=PATH)")
    if name != "full" and size is None:
        raise HarnessError(f"policy={name} needs a multi-state size: add size=K to model_args "
                           f"(e.g. policy={name},size=256)")
    try:
        return policies.from_name(name, size, sinks, observe)
    except ValueError as e:
        raise HarnessError(str(e).replace("--sinks", "sinks=").replace("--size", "size="))


def load_backend(directory: str, backend: str, dtype: torch.dtype, device: str, quantize):
    """msrnn's decoder, or a transformers model as an msrnn backend (msrnn.hf)."""
    if backend == "transformers":
        if quantize:
            raise HarnessError(f"quantize={quantize} quantizes msrnn's own decoder; drop it with "
                               f"backend=transformers")
        from .. import hf
        return hf.HFBackend(hf.load(directory, dtype=dtype, device=device))
    from ..checkpoint.loading import load
    return load(directory, dtype=dtype, device=device, quantize=quantize)


def check_requests(policy, scheme, limit: int, lengths: list, parallel: list, what: str):
    """All the requests of one call, before any runs: a bounded size smaller than the longest
    sequence (else it would never evict), and rotary positions within the model's range `limit`
    (msrnn.positions.check_range); `parallel`: the tokens of each read in one pass."""
    if not policy.bounded or not lengths:
        return
    longest = max(lengths)
    if policy.size >= longest:
        raise HarnessError(f"size={policy.size} is not smaller than the longest {what} "
                           f"({longest} tokens): the multi-state would never evict; use a "
                           f"smaller size or policy=full")
    for i, (n, p) in enumerate(zip(lengths, parallel)):
        try:
            check_range(policy, scheme, limit, n, p, what=f"{what} {i} ({n} tokens)")
        except ValueError as e:
            raise HarnessError(str(e).replace("(--positions)", "(model_args positions=)")
                               .replace(" (--past-range)", "")
                               .replace("allow_past_range=True", "positions=cache")) from None


@torch.inference_mode()
def score(model, policy, mode: Mode, scheme: Scheme, items: list) -> list:
    """[(log p(continuation), greedy?)] for a batch of (input ids [T], prompt length, continuation
    ids [N]), the input's last N tokens predicting the continuation. A prompt as long as the
    input: each input runs as msrnn.prompt schedules a `sequential` prompt (rows of one length
    as one batch). A shorter prompt (bounded, `oneshot`): the prompts fill one ragged
    multi-state (msrnn.prompt.fill), then its rows step together over their continuations, each
    leaving when it ends."""
    device = model.shape.device
    if all(prompt == len(inp) for inp, prompt, _ in items):
        out = [None] * len(items)
        for length in sorted({len(inp) for inp, _, _ in items}):
            rows = [i for i, (inp, _, _) in enumerate(items) if len(inp) == length]
            ids = torch.stack([items[i][0] for i in rows]).to(device)        # [B, T]
            state = model.init_state(len(rows), policy, None if policy.bounded else length,
                                     positions=scheme)
            hidden, _ = prefill(model, ids, state, Mode.SEQUENTIAL, logits=False)
            for r, i in enumerate(rows):
                cont = items[i][2].to(device)
                out[i] = continuation_logp(model, hidden[r, length - len(cont):], cont)
        return out
    rows = [inp[:prompt].to(device) for inp, prompt, _ in items]
    conts = [cont.to(device) for _, _, cont in items]
    state, logits = fill(model, rows, policy, mode, positions=scheme)   # logits [B, V]
    picked = [[logits[b:b + 1].float().log_softmax(-1)] for b in range(len(items))]
    live = list(range(len(items)))                       # the item of each multi-state row
    for j in range(1, max(len(c) for c in conts)):
        going = [r for r, i in enumerate(live) if j < len(conts[i])]
        if len(going) < len(live):                       # rows whose continuation ended leave
            state = state.select(torch.tensor(going, device=device))
            live = [live[r] for r in going]
        logits, state = model.step(torch.stack([conts[i][j - 1] for i in live]), state)
        for r, i in enumerate(live):
            picked[i].append(logits[r:r + 1].float().log_softmax(-1))
    return [pick(torch.cat(picked[i]), conts[i]) for i in range(len(items))]


def continuation_logp(model, hidden, cont, piece: int = 256):
    """(sum of log p(cont), greedy?) from the hidden states [N, E] that predict cont [N], a
    piece at a time (a long document's [N, V] logits would not fit in memory)."""
    total, greedy = 0.0, True
    for i in range(0, len(cont), piece):
        logp = model.logits(hidden[i:i + piece]).float().log_softmax(-1)   # [n, V]
        s, g = pick(logp, cont[i:i + piece])
        total, greedy = total + s, greedy and g
    return total, greedy


def pick(logp, cont):
    """log-probabilities [N, V] -> (sum of log p(cont[n]), whether each is the argmax)."""
    chosen = logp.gather(-1, cont[:, None])[:, 0]
    return float(chosen.double().sum()), bool((logp.argmax(-1) == cont).all())


@torch.inference_mode()
def generate_texts(model, tok, policy, mode: Mode, scheme: Scheme, eos_ids: set,
                   contexts: list, job: dict) -> list:
    """The texts generated for one batch of contexts (lists of ids) under `job` (until,
    max_gen_toks, temperature, top_k, top_p): msrnn.generate's loop, stopped when every row has
    met EOS or a stop string; each text is cut before its first stop string."""
    until = [s for s in job["until"] if s]
    new = [[] for _ in contexts]
    done = [False] * len(contexts)
    if job["max_gen_toks"] > 0:
        steps = stream(model, [torch.tensor(c) for c in contexts], policy, job["max_gen_toks"],
                       job["temperature"], job["top_k"], job["top_p"], None, mode, False,
                       eos_ids, scheme)
        for ids, _ in steps:                                  # ids [B]: one new token a row
            for b, token in enumerate(ids.tolist()):
                if done[b]:
                    continue
                if token in eos_ids:
                    done[b] = True
                    continue
                new[b].append(token)
                text = tok.decode(new[b], skip_special_tokens=True)
                done[b] = any(s in text for s in until)
            if all(done):
                steps.close()
                break
    texts = []
    for ids in new:
        text = tok.decode(ids, skip_special_tokens=True)
        for s in until:                                       # the text before the first stop
            text = text.split(s)[0]
        texts.append(text)
    return texts


def open_model(pretrained, backend: str, dtype: str, device: str, quantize):
    """(backend, tokenizer, torch device) that model_args name, checked before any weight is
    read; msrnn's one-line checkpoint errors as HarnessErrors."""
    if dtype not in DTYPES:
        raise HarnessError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
    if backend not in ("msrnn", "transformers"):
        raise HarnessError(f"backend={backend}: use msrnn or transformers")
    device = str(device or "cpu")
    if device == LM_EVAL_DEVICE and not torch.cuda.is_available():
        log.warning("device=%s (lm-eval's default) on a machine without CUDA: running on the "
                    "cpu, as lm-eval's hf model does; pass --device cpu", device)
        device = "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError(f"device={device}: this machine has no CUDA GPU; use device=cpu")
    try:
        directory = resolve(str(pretrained))
        tok = load_tokenizer(directory)
        model = load_backend(directory, backend, getattr(torch, dtype), device, quantize)
    except (ValueError, OSError) as e:
        raise HarnessError(f"pretrained={pretrained}: {e}") from None
    return model, tok, torch.device(device)


def encode(tok, string: str, add_special_tokens: bool | None = None) -> list:
    """Token ids of `string` as lm-eval's hf model encodes: with the special tokens the
    tokenizer adds (BOS, for some), unless add_special_tokens=False or the string already
    starts with the BOS text."""
    bos = tok.special.get("bos")
    if add_special_tokens is None and bos and string.startswith(bos):
        add_special_tokens = False
    if add_special_tokens is False and hasattr(tok, "backend"):          # tokenizer.json
        return tok.backend.encode(string, add_special_tokens=False).ids
    ids = tok.encode(string)
    if add_special_tokens is False and ids and ids[0] == tok.bos_id and not (
            bos and string.startswith(bos)):
        ids = ids[1:]                                   # sentencepiece: the BOS it added
    return ids


def generation_job(gen_kwargs: dict, default_max: int, eos_text: str) -> dict:
    """A request's generation arguments, normalized as lm-eval normalizes them: until (stop
    strings, EOS's text among them), max_gen_toks, and temperature (0: greedy), top_k, top_p."""
    kwargs = normalize_gen_kwargs(copy.deepcopy(gen_kwargs), default_max)
    ignored = sorted(set(kwargs) - GEN_KEYS)
    if ignored:
        log.warning("msrnn ignores the generation arguments %s", ", ".join(ignored))
    sampling = bool(kwargs.get("do_sample"))
    temperature = float(kwargs.get("temperature") or 0.0) if sampling else 0.0
    return {"until": tuple(handle_stop_sequences(kwargs.get("until"), eos=eos_text)),
            "max_gen_toks": int(kwargs["max_gen_toks"]),
            "temperature": temperature or (1.0 if sampling else 0.0),   # transformers' default
            "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}


@register_model("msrnn")
class MSRNNLM(TemplateLM):
    """An msrnn backend under one policy, as lm-eval's model. Keyword arguments: the model_args
    keys (KEYS); lm-eval's own `batch_size`, `max_batch_size` and `device` arrive the same way."""

    def __init__(self, pretrained: str = DEFAULT_MODEL, policy: str = "full", size=None,
                 sinks=None, positions: str = "original", prompt_mode: str = "oneshot",
                 observe: int = 1, dtype: str = "float32", device: str = "cpu",
                 backend: str = "msrnn", quantize=None, policy_module=None, batch_size=1,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise HarnessError(f"unknown model_args key(s) {', '.join(sorted(unknown))}: the "
                               f"msrnn model takes {', '.join(KEYS)}")
        if policy_module:
            import_policy_file(str(policy_module))
        self.policy = make_policy(str(policy), size, sinks, observe)
        try:
            self.scheme, self.mode = Scheme.of(positions), Mode.of(prompt_mode)
        except ValueError as e:
            raise HarnessError(str(e)) from None
        self.batch_size = _batch_size(batch_size)
        self.model, self.tok, self._device = open_model(pretrained, backend, dtype, device,
                                                        quantize)
        self.max_length = self.model.shape.positions          # the model's range
        if self.policy.bounded and self.policy.size >= self.max_length:
            raise HarnessError(f"size={self.policy.size} is not smaller than the model's range "
                               f"of {self.max_length} positions: it would never evict; use a "
                               f"smaller size or policy=full")
        self.pretrained = str(pretrained)
        self.eos_ids = set(self.model.eos_ids) | self.tok.eos_ids
        # Bounded and oneshot: a context is compressed once, its continuation stepped.
        self.steps = self.policy.bounded and self.mode is Mode.ONESHOT

    # -- what lm-eval asks of a model: tokens, chat ----------------------------------------------

    eot_token_id = property(lambda self: self.tok.eos_id)
    device = property(lambda self: self._device)
    max_gen_toks = 256                                   # lm-eval's default, as its hf model's
    tokenizer_name = property(lambda self: self.pretrained.replace("/", "__"))

    @property
    def prefix_token_id(self) -> int:
        """The token that conditions an empty context (lm-eval: BOS, else EOS)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list:
        return encode(self.tok, string, add_special_tokens)

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template=False) -> str | None:
        return self.tok.chat_template() if chat_template else None

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        """The conversation as the checkpoint's chat template writes it. Without a generation
        prompt, the last message is left open (transformers' continue_final_message): the text
        ends where that message's content ends, so a continuation can follow it."""
        text = self.tok.apply_chat_template(chat_history, add_generation_prompt)
        last = str(chat_history[-1]["content"]).strip() if chat_history else ""
        end = text.rfind(last) if last and not add_generation_prompt else -1
        return text if end < 0 else text[:end + len(last)]

    # -- the three request types -----------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """[(key, context ids, continuation ids)] -> [(log p(continuation), greedy?)]: the
        input that predicts each continuation (Full: cut on the left to the model's range, as
        lm-eval's hf model cuts it; bounded: all of it), longest first, batch_size at a time."""
        items = []
        for _, ctx, cont in requests:
            whole = (ctx + cont) if self.policy.bounded else (ctx + cont)[-(self.max_length + 1):]
            inp = torch.tensor(whole[:-1], dtype=torch.long)
            items.append((inp, len(inp) - len(cont) + 1 if self.steps else len(inp),
                          torch.tensor(cont, dtype=torch.long)))
        check_requests(self.policy, self.scheme, self.max_length, [len(x) for x, _, _ in items],
                       [p if self.steps else 0 for _, p, _ in items], "loglikelihood request")
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        out = [None] * len(items)
        for start in tqdm(range(0, len(order), self.batch_size), "msrnn loglikelihood",
                          disable=disable_tqdm):
            batch = order[start:start + self.batch_size]
            answers = score(self.model, self.policy, self.mode, self.scheme,
                            [items[i] for i in batch])
            for i, answer in zip(batch, answers):
                out[i] = answer
                if requests[i][0] is not None:             # not a rolling window
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """log p(document) for each request's text. Full: lm-eval's disjoint windows of the
        model's range, each conditioned on the tokens before it in the window (what its hf model
        computes); a bounded policy: the whole document after the prefix token, one sequence."""
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text)
            pairs = [([self.prefix_token_id], ids)] if self.policy.bounded else \
                map(make_disjoint_window, get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length, context_len=1))
            for ctx, cont in pairs:
                windows.append((None, ctx, cont))
                owner.append(n)
        out = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            out[n] += logp
        for req, logp in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, logp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Each request's continuation of its context: msrnn.generate's loop under the policy,
        until EOS, a stop string (`until`) or max_gen_toks; the text is cut before the stop.
        Full: the context cut on the left to leave room for max_gen_toks (as lm-eval's hf)."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            job = generation_job(gen_kwargs, self.max_gen_toks, eos)
            n, ids = job["max_gen_toks"], self.tok_encode(context)
            if not self.policy.bounded and n >= self.max_length:
                raise HarnessError(f"max_gen_toks {n} must be smaller than the model's range "
                                   f"({self.max_length}) with policy=full")
            jobs.append((ids if self.policy.bounded else ids[-(self.max_length - n):], job))
        check_requests(self.policy, self.scheme, self.max_length,
                       [len(ids) + max(job["max_gen_toks"] - 1, 0) for ids, job in jobs],
                       [len(ids) if self.mode is Mode.ONESHOT else 0 for ids, _ in jobs],
                       "generate_until request")
        groups, out = {}, [None] * len(jobs)
        for i, (_, job) in enumerate(jobs):                # a batch shares its gen kwargs
            groups.setdefault(repr(sorted(job.items())), []).append(i)
        batches = [rows[s:s + self.batch_size] for rows in groups.values()
                   for rows in [sorted(rows, key=lambda i: -len(jobs[i][0]))]
                   for s in range(0, len(rows), self.batch_size)]
        for batch in tqdm(batches, "msrnn generate_until", disable=disable_tqdm):
            texts = generate_texts(self.model, self.tok, self.policy, self.mode, self.scheme,
                                   self.eos_ids, [jobs[i][0] for i in batch], jobs[batch[0]][1])
            for i, text in zip(batch, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def _batch_size(value) -> int:
    """model_args' or lm-eval's --batch_size: a positive integer ('auto' is not measured)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HarnessError(f"batch_size={value}: give a positive integer (msrnn does not "
                           f"measure batch_size=auto)")
    return value


def cli(argv: list) -> int:
    """`msrnn lm-eval ARGS...`: lm-eval's own command line, with the "msrnn" model registered
    (this module is imported). Errors of msrnn's making end in one line and exit status 2."""
    from lm_eval.__main__ import cli_evaluate

    from ..checkpoint.loading import CheckpointError

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (HarnessError, CheckpointError) as e:
        print(f"msrnn lm-eval: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0


__all__ = ["HarnessError", "MSRNNLM", "import_policy_file", "cli"]
