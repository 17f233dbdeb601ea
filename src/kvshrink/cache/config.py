"""Cache spec strings: ``[POLICY:opts+]CODEC:opts[+cache:opts]``.

Grammar (stages are the ``core.spec`` stages; order is free, the canonical form is fixed)::

    cache_spec := stage ('+' stage)*          one codec stage, at most one policy stage,
                                              at most one 'cache' stage
    codec      := any registered codec         int4, kivi:b=2, fp16, ...
    policy     := any registered policy        snapkv:ratio=0.75, streamingllm:sinks=4,budget=256
    cache      := 'cache' (':' window=N, block=N, chunk=N, kernels=auto|triton|torch)
    layers     := 'layers:at=[..],codec=[..]' | key=[..] | value=[..]   per-layer tiers over the codec

Examples: ``int4``, ``kivi:b=2``, ``snapkv:ratio=0.75+fp16``,
``streamingllm:sinks=4,budget=256+int4+cache:window=64``,
``mikv:ratio=0.75,low=[fibquant:b=1,k=8]+fibquant:b=2``,
``layers:at=[10,19],key=[fibquant:b=3,k=4]+fibquant:b=2,k=4`` (:mod:`kvshrink.codecs.plan`: the
codec stage is the base, tiers override it on listed layers; a layer's keys and values may differ
only in rate, since a cache layer holds one codec).

A precision policy (``mikv``, ``zipcache``) names a second codec in its ``low`` option; it is
resolved here like the main codec (same registry, same fp16-range rule), printed back in its
canonical form, and must differ from the main codec. ``str(CacheSpec)`` prints
``policy+codec[+cache]`` with the cache stage only when it differs from the defaults. Page
policies (``quest``, ``arkvale``) change those defaults: ``block`` is their ``page`` (another
explicit block raises) and ``window`` is 0 unless given.

Codec options that keep token ranges in fp16 inside one encode (KIVI's ``residual``, the
rotation codecs' ``sinks`` and ``window``) are set to 0 inside the cache: every block is one
encode, so they would keep fp16 tokens in *every* block; the cache's ``window`` (and a
``streamingllm`` policy for sinks) plays that role. Their defaults are accepted and replaced;
another value raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..codecs import CODECS, Codec, CodecConfig, make_codec
from ..codecs.plan import NAME as LAYERS
from ..codecs.plan import LayerPlan, parse_layer_plan
from ..core.errors import SpecError
from ..core.spec import SpecConfig, build_config, format_config, nearest, parse_stage, split_stages
from ..policies import POLICIES, Policy, PolicyConfig, PrecisionConfig
from ..policies.paged import PagePolicyConfig

__all__ = ["CacheConfig", "CacheSpec", "parse_cache_spec"]

_FP16_RANGES = ("residual", "sinks", "window")  # codec options keeping tokens in fp16 per encode


HOLD_DTYPES = {"model": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheConfig(SpecConfig):
    """Options of the cache itself.

    ``window``: newest tokens kept in full precision (the model's dtype); older tokens move to
    packed storage ``block`` tokens at a time, so a layer holds ``window`` to
    ``window + block - 1`` full-precision tokens. ``chunk``: keys per online-softmax step;
    consecutive decoded blocks are concatenated up to this many tokens, which bounds the
    transient full-precision buffer of a read to ``chunk`` tokens per layer. ``kernels``:
    ``auto`` reads decode steps with the Triton kernels on CUDA where the cache allows it
    (:mod:`.store`), ``torch`` always with the PyTorch path, ``triton`` insists on the kernels
    (an error where they cannot serve the cache; CPU tensors need ``TRITON_INTERPRET=1``).
    ``dtype``: what the full-precision tokens (window and block tail) are held in: ``model``
    (the model's dtype), ``float16`` or ``bfloat16``. On CPU models compute in fp32, so their
    window costs twice the fp16 baseline it is measured against; ``float16`` holds it as a GPU
    model would (reads upcast it; the prompt's attention to its own tokens stays exact).
    ``sinks``: the first tokens of the sequence are never packed but held like the window, for
    good: they are attention sinks (40-60% of the attention mass in SmolLM2's later layers), so
    their key error moves every softmax. Read by the PyTorch path (no kernel store).
    """

    name: ClassVar[str] = "cache"
    window: int = 128
    block: int = 128
    chunk: int = 2048
    kernels: str = "auto"
    dtype: str = "model"
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise SpecError(f"cache: sinks must be >= 0 tokens, got {self.sinks}")
        if self.dtype not in HOLD_DTYPES:
            raise SpecError(f"cache: dtype must be one of {', '.join(HOLD_DTYPES)}, got {self.dtype!r}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise SpecError(f"cache: kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.window < 0:
            raise SpecError(f"cache: window must be >= 0 tokens, got {self.window}")
        if self.block < 1:
            raise SpecError(f"cache: block must be >= 1 token, got {self.block}")
        if self.chunk < 1:
            raise SpecError(f"cache: chunk must be >= 1 token, got {self.chunk}")

    def __str__(self) -> str:
        return format_config(self)


@dataclass(frozen=True)
class CacheSpec:
    """A parsed cache spec: optional policy, one codec, cache options."""

    codec: CodecConfig
    policy: PolicyConfig | None = None
    cache: CacheConfig = CacheConfig()
    low: CodecConfig | None = None  # a precision policy's low codec
    plan: LayerPlan | None = None  # per-layer tiers over ``codec`` (its base)

    def __str__(self) -> str:
        parts = [str(self.policy)] if self.policy is not None else []
        parts.append(str(self.plan) if self.plan is not None else str(self.codec))
        default = _aligned(self.policy, CacheConfig(), set())  # a page policy moves the defaults
        changed = [
            f"{f.name}={getattr(self.cache, f.name)}"
            for f in dataclasses.fields(CacheConfig)
            if getattr(self.cache, f.name) != getattr(default, f.name)
        ]
        if changed:
            parts.append(f"{CacheConfig.name}:{','.join(changed)}")
        return "+".join(parts)

    def build_codec(self) -> Codec:
        """The codec used for packed blocks (its own residual window, if any, set to 0)."""
        return _in_cache(self.codec)

    def build_layer_codecs(self, n_layers: int) -> list[Codec]:
        """The codec of each of ``n_layers`` layers: the base, or a plan's tier; one object per
        distinct codec, so layers at the same rate share their codebooks and rotation."""
        if self.plan is None:
            return [self.build_codec()] * n_layers
        built: dict[str, Codec] = {str(self.codec): self.build_codec()}
        out = []
        for cfg in self.plan.layer_configs(n_layers):
            if str(cfg) not in built:
                built[str(cfg)] = _in_cache(cfg)
            out.append(built[str(cfg)])
        return out

    def key_transforms(self, n_layers: int) -> list[tuple[int, float]]:
        """``(rank, shrink)`` of each layer's query-aware key basis (rank 0: none), from ``white=``/``wshrink=``."""
        configs = [self.codec] * n_layers if self.plan is None else self.plan.layer_configs(n_layers)
        return [(int(getattr(c, "white", 0)), float(getattr(c, "wshrink", 0.1))) for c in configs]

    def build_low_codec(self) -> Codec | None:
        """The codec of low-precision runs, when the policy is a precision policy."""
        return None if self.low is None else _in_cache(self.low)

    def build_policy(self) -> Policy | None:
        return None if self.policy is None else POLICIES.build(str(self.policy))


def parse_cache_spec(spec: str, **cache_options: Any) -> CacheSpec:
    """Parse ``spec``; ``cache_options`` (``window=64``) override the ``cache`` stage."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty cache spec: expected e.g. 'int4' or 'snapkv:ratio=0.75+fp16'")
    codec: CodecConfig | None = None
    policy: PolicyConfig | None = None
    cache: CacheConfig | None = None
    explicit: set[str] = set()  # cache options given, which a page policy must not override
    tiers: list[str] = []
    for text in split_stages(spec):
        stage = parse_stage(text)
        if stage.name == LAYERS:
            tiers.append(text)
        elif stage.name == CacheConfig.name:
            if cache is not None:
                raise SpecError(f"more than one 'cache' stage in {spec!r}")
            cache = build_config(CacheConfig, stage)
            explicit = {key for key, _ in stage.options}
        elif stage.name in POLICIES:
            if policy is not None:
                raise SpecError(f"more than one policy in {spec!r}; a cache takes at most one")
            policy = POLICIES.config(stage)
        elif stage.name in CODECS:
            if codec is not None:
                raise SpecError(f"more than one codec in {spec!r}; a cache takes exactly one")
            codec = CODECS.config(stage)
        else:
            names = [*POLICIES.names(), *CODECS.names(), CacheConfig.name, LAYERS]
            hint = nearest(stage.name, names)
            near = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise SpecError(
                f"unknown stage {stage.name!r} in {spec!r}{near}; policies: {', '.join(POLICIES.names())}; "
                f"codecs: {', '.join(CODECS.names())}; cache options: cache:window=N,block=N,chunk=N,kernels=auto|triton|torch"
            )
    if codec is None:
        raise SpecError(f"{spec!r} has no codec stage; add one, e.g. '{spec}+int4' (or '+fp16' for none)")
    low = None
    if isinstance(policy, PrecisionConfig):
        low = CODECS.config(policy.low)
        if low == codec:
            raise SpecError(
                f"{policy.name}: low={low} is the main codec, so demoting would save nothing; "
                "give a lower-rate codec, e.g. low=[fibquant:b=1,k=8]"
            )
        policy = dataclasses.replace(policy, low=str(low))
    plan = parse_layer_plan("+".join([*tiers, str(codec)])) if tiers else None
    if plan is not None and not plan.overrides:
        plan = None  # every tier restates the base codec
    if plan is not None:
        plan.layer_configs(
            plan.max_layer + 1
        )  # roles that cannot share one codec fail here, before a model loads
    checked = [c for c in (codec, low) if c is not None] + ([*plan.configs()] if plan is not None else [])
    for cfg in checked:
        for name in _FP16_RANGES:
            value = getattr(cfg, name, None)
            if value not in (None, 0, _default(cfg, name)):
                raise SpecError(
                    f"{cfg.name}: {name}={value} would keep fp16 tokens in every packed block of "
                    "CompressedCache; use cache:window=N for the full-precision window (and streamingllm for sinks)"
                )
    for cfg in (c for c in checked if getattr(c, "prerope", False)):
        raise SpecError(
            f"{cfg.name}: prerope=1 is served by the frontier harness only; CompressedCache codes the keys "
            "it is given, after RoPE, so drop prerope=1 from cache specs"
        )
    cache = cache or CacheConfig()
    if cache_options:
        fields = {f.name for f in dataclasses.fields(CacheConfig)}
        unknown = sorted(set(cache_options) - fields)
        if unknown:
            raise SpecError(f"unknown cache option(s) {unknown}; valid: {', '.join(sorted(fields))}")
        cache = dataclasses.replace(cache, **cache_options)
        explicit |= set(cache_options)
    cache = _aligned(policy, cache, explicit)
    if cache.sinks and policy is not None:
        raise SpecError(
            f"cache:sinks={cache.sinks} is for caches without a token policy ({policy.name} "
            "moves and evicts slots); beside a policy use streamingllm:sinks=N"
        )
    return CacheSpec(codec=codec, policy=policy, cache=cache, low=low, plan=plan)


def _in_cache(config: CodecConfig) -> Codec:
    """Build a codec with its fp16 token ranges set to 0 (the cache window plays that role) and
    no ``white`` (the layer holds its keys in the fitted basis itself, :mod:`.keyspace`)."""
    names = {f.name for f in dataclasses.fields(config)}
    zeroed = {n: 0 for n in (*_FP16_RANGES, "white") if n in names}
    return make_codec(str(dataclasses.replace(config, **zeroed)))


def _aligned(policy: PolicyConfig | None, cache: CacheConfig, explicit: set[str]) -> CacheConfig:
    """Page policies (Quest, ArkVale) set the block to their page and the window to 0 unless given."""
    return policy.align_cache(cache, explicit) if isinstance(policy, PagePolicyConfig) else cache


def _default(config: Any, name: str) -> Any:
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.default
    return None
