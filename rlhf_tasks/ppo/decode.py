"""Static-cache decoding: experience generation without `generate`'s per-token machinery.

    decoder = StaticDecoder(hf_causal_lm, compile_step=False)
    sequences = decoder.generate(input_ids, attention_mask, settings)   # [B, P] left padded -> [B, P + N]

One prefill over the (bucketed) prompt, its leading tokens that every row shares (a chat template's system prompt:
`shared_prefix_length`) computed once for the batch, then one forward of the model's own decoder per new token into
a KV cache preallocated for (batch, prompt width + max_new_tokens) (transformers' `StaticCache`), with the attention
mask built by us once per step (a 4D mask is passed through by the model as is) and the next token chosen by the
small tensor functions below (temperature, top-k, top-p, min new tokens, EOS stop, pad after EOS). Prompt widths
are rounded up to a multiple of `bucket` and never shrink within a decoder, so the decode step sees the same shapes
every call: `torch.compile` of the step (CUDA graphs on GPU) compiles once per stage, not per step.

The output follows `generate`'s contract: sequences [B, P + n] with n <= max_new_tokens the number of steps until
every row emitted EOS, `pad_token_id` after a row's EOS. Greedy output equals `generate`'s token for token; sampled
tokens come from the same distribution (the exponential race instead of `torch.multinomial`, so the random stream
is consumed differently). `unsupported_reason` says which models and arguments this does not cover; the hybrid
engine falls back to `generate` for those (`settings_from_generate_kwargs` for arguments).

Shapes: B = batch, V = vocabulary, L = cache length (bucketed prompt width + max_new_tokens), E = EOS ids.
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import torch

from ..training.private_internals import attention_implementation, supports_static_cache


# ---- sampling: small pure functions on one step's logits [B, V] ------------------------------------------------
def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (1.0: unchanged). logits [B, V] -> [B, V]"""
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept), -inf elsewhere; k <= 0 or k >= V: unchanged.
    logits [B, V] -> [B, V]"""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose cumulative probability (smallest first) is <= 1 - p; the
    most likely token always stays; p >= 1: unchanged. logits [B, V] -> [B, V] (-inf where dropped)"""
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, dim=-1)
    drop_sorted = ascending.softmax(-1).cumsum(-1) <= 1 - p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def forbid_tokens(logits: torch.Tensor, token_ids: torch.Tensor, forbid: torch.Tensor | bool) -> torch.Tensor:
    """-inf at `token_ids` where `forbid` (a bool, or a 0-d/[B, 1] bool tensor: e.g. fewer than min_new_tokens
    generated so far). logits [B, V], token_ids [E] -> [B, V]"""
    is_listed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    is_listed[token_ids] = True
    return logits.masked_fill(is_listed & forbid, -math.inf)


def sample_from_logits(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(logits), by the exponential race: argmax_i p_i / e_i with e_i ~ Exp(1)
    independent is token i with probability p_i / sum(p) (the smallest of independent exponentials with rates p_i).
    `noise` must be positive (zero noise would make a filtered token with p = 0 a 0/0 NaN: `exponential_noise`).
    logits [B, V] (-inf for excluded tokens), noise [B, V] -> tokens [B] (long)"""
    return (logits.softmax(-1) / noise).argmax(-1)


def exponential_noise(shape: torch.Size, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Exp(1) draws as -log(U), U ~ Uniform[0, 1) (torch's `exponential_` is ~10x slower on CPU). Never 0, as
    `sample_from_logits` needs (U < 1); U = 0 gives inf, which only makes that token lose. -> [shape] float32"""
    return torch.rand(shape, dtype=torch.float32, device=device, generator=generator).log_().neg_()


def mark_finished(tokens: torch.Tensor, finished: torch.Tensor, eos_ids: torch.Tensor,
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows already finished get `pad_id`; a row finishes at its first EOS (which it keeps).
    tokens [B], finished [B] bool, eos_ids [E] -> (tokens [B], finished [B])"""
    tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
    return tokens, finished | torch.isin(tokens, eos_ids)


@dataclass(frozen=True)
class SamplingSettings:
    """What the next token depends on, `generate`'s meaning for each field (do_sample=False ignores the three
    warpers; top_k=0 and top_p=1 disable them)."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0


def choose_next(logits: torch.Tensor, s: SamplingSettings, eos_ids: torch.Tensor, n_generated: torch.Tensor,
                noise: torch.Tensor | None) -> torch.Tensor:
    """The next token of every row, `generate`'s order: EOS forbidden before min_new_tokens, then temperature,
    top-k, top-p, then sample (or argmax when greedy). logits [B, V] float32, n_generated 0-d long, noise [B, V]
    (None when greedy) -> tokens [B]"""
    if s.min_new_tokens > 0:
        logits = forbid_tokens(logits, eos_ids, n_generated < s.min_new_tokens)
    if not s.do_sample:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(scale_by_temperature(logits, s.temperature), s.top_k), s.top_p)
    return sample_from_logits(logits, noise)


# ---- what the decoder covers ----------------------------------------------------------------------------------
_SETTING_ARGS = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "min_new_tokens", "pad_token_id",
                 "eos_token_id")
_IGNORED_ARGS = ("use_cache",)


def settings_from_generate_kwargs(model, kwargs: dict) -> tuple[SamplingSettings | None, str | None]:
    """`generate` keyword arguments -> (settings, None), or (None, why not covered). Arguments not given come from
    the model's generation_config, as in `generate`; any other generation setting that differs from
    transformers' default (beams, repetition penalty, min_p, ...) is not covered."""
    from transformers import GenerationConfig

    extra = sorted(k for k, v in kwargs.items() if k not in _SETTING_ARGS + _IGNORED_ARGS and v is not None)
    if extra:
        return None, f"generate argument(s) {', '.join(extra)} not covered"
    gc = getattr(model, "generation_config", None) or GenerationConfig()
    default = GenerationConfig()
    for field in ("num_beams", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size", "min_p",
                  "typical_p", "epsilon_cutoff", "eta_cutoff", "bad_words_ids", "suppress_tokens",
                  "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                  "renormalize_logits", "encoder_repetition_penalty", "exponential_decay_length_penalty",
                  "guidance_scale", "watermarking_config", "min_length", "max_time", "stop_strings"):
        if getattr(gc, field, None) != getattr(default, field, None):
            return None, f"generation_config.{field}={getattr(gc, field)!r} not covered"

    def arg(name):
        return kwargs[name] if kwargs.get(name) is not None else getattr(gc, name, None)

    if arg("max_new_tokens") is None:
        return None, "max_new_tokens not given"
    eos = arg("eos_token_id")
    eos_ids = tuple(int(e) for e in ([] if eos is None else [eos] if isinstance(eos, int) else eos))
    pad = arg("pad_token_id")
    if pad is None:
        if not eos_ids:
            return None, "neither pad_token_id nor eos_token_id given"
        pad = eos_ids[0]  # generate's fallback too
    return SamplingSettings(
        max_new_tokens=int(arg("max_new_tokens")), eos_token_ids=eos_ids, pad_token_id=int(pad),
        do_sample=bool(arg("do_sample")), temperature=float(arg("temperature") or 1.0), top_k=int(arg("top_k") or 0),
        top_p=float(arg("top_p") if arg("top_p") is not None else 1.0),
        min_new_tokens=int(arg("min_new_tokens") or 0)), None


def unsupported_reason(model) -> str | None:
    """Why `StaticDecoder` cannot run `model` (None when it can): it needs a decoder-only causal LM whose forward
    takes `cache`, `position_ids` and a 4D attention mask (sdpa or eager attention) and whose cache layers are all
    full (not sliding-window, not linear/recurrent) static layers."""
    from transformers.cache_utils import StaticCache, StaticLayer

    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return "not a decoder-only model"
    if not supports_static_cache(model):
        return f"{type(model).__name__} does not support a static cache (_can_compile_fullgraph is False)"
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("cache", "position_ids", "attention_mask") if p not in params]
    if missing:
        return f"{type(model).__name__}.forward lacks {', '.join(missing)}"
    impl = attention_implementation(cfg)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the decoder passes a 4D mask: sdpa or eager only)"
    try:
        layers = StaticCache(config=cfg, max_cache_len=8).layers
    except Exception as exc:  # noqa: BLE001 - any failure to build the cache means: not covered
        return f"StaticCache cannot be built for it ({type(exc).__name__}: {exc})"
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if kinds:
        return f"cache layers {', '.join(kinds)} (only full-attention static layers are covered)"
    return None


# ---- the decode loop ------------------------------------------------------------------------------------------
def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def prompt_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded prompts, as `generate` makes them: 0.. over the real tokens, 0 on padding.
    mask [B, P] -> [B, P] (long)"""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def prefill_attention(key_mask: torch.Tensor, width: int, start: int = 0) -> torch.Tensor:
    """Who may attend to whom in the prefill of cache slots [start, width): query q sees key k <= q that is a real
    token, and itself (a padding query attends only to itself, so its hidden state stays finite: a NaN there would
    reach the cache). key_mask [B, L] (1 for real tokens) -> allowed [B, 1, width - start, L] bool"""
    L = key_mask.shape[1]
    q = torch.arange(start, width, device=key_mask.device)[:, None]
    k = torch.arange(L, device=key_mask.device)[None, :]
    return ((k <= q) & (key_mask.bool()[:, None, None, :] | (k == q)))


def shared_prefix_length(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading real tokens every left-padded prompt has in common (a chat template's system prompt), at
    most the shortest prompt's length minus one (every row keeps a token of its own to predict from).
    input_ids, mask [B, P] -> c"""
    lengths = mask.long().sum(1)
    B, P = input_ids.shape
    shortest = int(lengths.min())
    if B < 2 or shortest < 2:
        return 0
    # the j-th real token of every row, j < shortest: row i's real tokens start at column P - length_i
    cols = (P - lengths)[:, None] + torch.arange(shortest - 1, device=input_ids.device)[None, :]
    firsts = input_ids.gather(1, cols)
    same = (firsts == firsts[:1]).all(0)
    return int(same.long().cumprod(0).sum())


def shared_prefix_layout(input_ids: torch.Tensor, mask: torch.Tensor, c: int, width: int,
                         pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts re-laid for a shared prefix of c tokens: the prefix in slots [0, c) (the same in every
    row, so its keys and values are computed once), each row's remaining tokens right-aligned at `width`, padding
    between. Positions counted over real tokens (`prompt_positions`) are the same as in the left-padded layout.
    input_ids, mask [B, P] (P <= width) -> (ids [B, width], mask [B, width])"""
    B, P = input_ids.shape
    own = mask.bool() & (mask.long().cumsum(1) > c)  # real tokens after the prefix: all in columns [c, P)
    ids = torch.full((B, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    new_mask = torch.zeros((B, width), dtype=mask.dtype, device=mask.device)
    first_row_start = P - int(mask[0].sum())
    ids[:, :c] = input_ids[0, first_row_start:first_row_start + c]
    new_mask[:, :c] = 1
    tail = width - (P - c)
    ids[:, tail:] = torch.where(own[:, c:], input_ids[:, c:], torch.full_like(input_ids[:, c:], pad_id))
    new_mask[:, tail:] = own[:, c:].to(mask.dtype)
    return ids, new_mask


def attention_bias(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask the model's attention takes: sdpa a bool mask, eager an additive one (0 / dtype min).
    allowed [B, 1, Q, L] bool -> [B, 1, Q, L]"""
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


class StaticDecoder:
    """Greedy/sampled decoding of one HF causal LM with a preallocated static KV cache (see the module docstring).

    `compile_step`: run the decode step (one token's forward + the choice of the next token) through
    `torch.compile` (on CUDA with CUDA graphs, mode "reduce-overhead"); `compile_s` accumulates the seconds the
    compiled step's first calls (compilation, graph capture) took. `check_every`: look at "every row finished" every
    this many steps (each look is a device sync; extra steps past the last EOS are trimmed, so the output is the
    same)."""

    def __init__(self, model: torch.nn.Module, *, compile_step: bool = False, bucket: int = 16,
                 check_every: int = 1, min_shared_prefix: int = 8):
        self.model, self.bucket, self.check_every = model, bucket, check_every
        self.min_shared_prefix = min_shared_prefix
        self.last_shared_prefix = 0  # tokens of the last call's prompts computed once for all rows
        self.compile_step = compile_step
        self.width = 0  # bucketed prompt width: only grows, so shapes repeat
        self.compile_s = 0.0
        self._cache = None
        self._cache_key: tuple | None = None
        self._compiled: dict[tuple, object] = {}
        self._warmup_calls: dict[tuple, int] = {}  # first calls of a compiled step still to be timed as compile
        self._keep_logits = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters
                             else {})

    # one forward of the model over new tokens with our cache and mask -> logits of the last position [B, V] fp32
    def _forward(self, tokens, positions, mask4d, cache) -> torch.Tensor:
        out = self.model(input_ids=tokens, attention_mask=mask4d, position_ids=positions, cache=cache,
                         use_cache=True, **self._keep_logits)
        return out.logits[:, -1].float()

    def _prefill_shared_prefix(self, prefix, positions, cache, batch: int, impl: str, dtype) -> None:
        """The keys and values of the prompts' shared prefix, computed for one row and written into every row's
        cache slots [0, c) (the prefill of a batch of chat prompts is mostly their common system prompt).
        prefix, positions [1, c]"""
        from transformers import DynamicCache

        own = DynamicCache()
        allowed = prefill_attention(torch.ones_like(prefix), prefix.shape[1])
        self.model(input_ids=prefix, attention_mask=attention_bias(allowed, impl, dtype), position_ids=positions,
                   cache=own, use_cache=True, **self._keep_logits)
        for i, layer in enumerate(own.layers):
            cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)

    def _step(self, tokens, positions, mask4d, cache, finished, n_generated, noise, s: SamplingSettings, eos_ids):
        """One decode step: forward one token per row, choose the next. tokens, positions [B, 1], mask4d
        [B, 1, 1, L], finished [B] -> (next tokens [B], finished [B])"""
        logits = self._forward(tokens, positions, mask4d, cache)
        nxt = choose_next(logits, s, eos_ids, n_generated, noise)
        return mark_finished(nxt, finished, eos_ids, s.pad_token_id)

    def _step_fn(self, s: SamplingSettings, shape_key: tuple):
        """The decode step for these settings and shapes: `_step`, or its compiled version (compiled on first use,
        then reused: the settings and shapes are the same every call of a stage)."""
        if not self.compile_step:
            return self._step
        key = (s, shape_key)
        if key not in self._compiled:
            on_cuda = next(self.model.parameters()).is_cuda
            self._compiled[key] = torch.compile(self._step, mode="reduce-overhead" if on_cuda else None,
                                                dynamic=False)
            self._warmup_calls[key] = 2  # compilation, then (CUDA graphs) the capture
        return self._compiled[key]

    def _static_cache(self, batch: int, length: int, dtype, dev):
        from transformers import StaticCache

        key = (batch, length, dtype, dev)
        if self._cache_key != key:  # a new shape: one cache (the previous one is dropped)
            self._cache, self._cache_key = StaticCache(config=self.model.config, max_cache_len=length), key
        else:
            self._cache.reset()
        return self._cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
        """Left-padded prompts input_ids, attention_mask [B, P] -> sequences [B, P + n] (`generate`'s output)."""
        model, dev = self.model, input_ids.device
        B, P = input_ids.shape
        N = s.max_new_tokens
        self.width = max(self.width, round_up(P, self.bucket))
        W, L = self.width, self.width + N
        c = shared_prefix_length(input_ids, attention_mask)
        c = c if c >= self.min_shared_prefix else 0
        self.last_shared_prefix = c
        if c:
            ids, prompt_mask = shared_prefix_layout(input_ids, attention_mask, c, W, s.pad_token_id)
        else:
            ids = torch.nn.functional.pad(input_ids, (W - P, 0), value=s.pad_token_id)
            prompt_mask = torch.nn.functional.pad(attention_mask, (W - P, 0), value=0)
        key_mask = torch.zeros(B, L, dtype=torch.long, device=dev)
        key_mask[:, :W] = prompt_mask
        impl = attention_implementation(model.config)
        dtype = next(model.parameters()).dtype
        eos_ids = torch.tensor(s.eos_token_ids or [-1], dtype=torch.long, device=dev)
        cache = self._static_cache(B, L, dtype, dev)
        step_key = (s, (B, L, dtype, dev))
        step = self._step_fn(*step_key)
        cuda_graphs = self.compile_step and dev.type == "cuda"

        positions = prompt_positions(key_mask[:, :W])
        if c:
            self._prefill_shared_prefix(ids[:1, :c], positions[:1, :c], cache, B, impl, dtype)
        logits = self._forward(ids[:, c:], positions[:, c:],
                               attention_bias(prefill_attention(key_mask, W, start=c), impl, dtype), cache)
        noise = exponential_noise(logits.shape, dev) if s.do_sample else None
        zero = torch.zeros((), dtype=torch.long, device=dev)
        tokens, finished = mark_finished(choose_next(logits, s, eos_ids, zero, noise),
                                         torch.zeros(B, dtype=torch.bool, device=dev), eos_ids, s.pad_token_id)
        out = torch.full((B, N), s.pad_token_id, dtype=input_ids.dtype, device=dev)
        out[:, 0] = tokens
        position = positions[:, -1:]
        n = 1
        while n < N:
            if n % self.check_every == 0 and bool(finished.all()):
                break
            key_mask[:, W + n - 1] = 1  # the token fed now occupies cache slot W + n - 1
            position = position + 1
            mask4d = attention_bias(key_mask.bool()[:, None, None, :], impl, dtype)
            noise = exponential_noise(logits.shape, dev) if s.do_sample else None
            warming = self._warmup_calls.get(step_key, 0) > 0
            t0 = time.perf_counter()
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            tokens, finished = step(tokens[:, None], position, mask4d, cache, finished,
                                    torch.full((), n, dtype=torch.long, device=dev), noise, s, eos_ids)
            if cuda_graphs:  # outputs live in the graph's memory, overwritten by the next replay
                tokens, finished = tokens.clone(), finished.clone()
            out[:, n] = tokens
            if warming:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                self.compile_s += time.perf_counter() - t0
                self._warmup_calls[step_key] -= 1
            n += 1
        return torch.cat([input_ids, out[:, :_steps_until_all_finished(out[:, :n], eos_ids)]], dim=1)


def _steps_until_all_finished(out: torch.Tensor, eos_ids: torch.Tensor) -> int:
    """`generate` stops after the step where the last row emitted its EOS. out [B, n] -> that step count (<= n)"""
    is_eos = torch.isin(out, eos_ids)
    if not bool(is_eos.any(1).all()):
        return out.shape[1]
    return int(is_eos.int().argmax(1).max()) + 1
