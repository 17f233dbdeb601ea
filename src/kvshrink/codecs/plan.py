"""Per-layer codec plans: which codec codes each layer's keys and values.

Layers differ by orders of magnitude in how much their K/V error moves the next-token
distribution (benchmarks/layer_sensitivity.py), so one rate for every layer wastes bytes on the
robust layers and starves the sensitive ones. A plan names a base codec and tiers that override
it on listed layers, for both roles or for keys or values only::

    layers:at=[0-1,29],codec=[fibquant:b=3,k=4]+layers:at=[12],value=[fibquant:b=1.5,k=4]+fibquant:b=2,k=4

``at`` lists layers and ranges ``a-b`` (inclusive); ``codec=`` sets both roles, ``key=`` /
``value=`` one. ``heads=`` narrows a tier to some KV heads of its layers
(``layers:at=[3],heads=[0],key=[fibquant:b=3,k=4]``): heads of one layer differ as much as layers
do (one SmolLM2 layer's key heads span 20x in KL, ``benchmarks/head_sensitivity.py``). Head tiers
override the layer tiers on their heads; the frontier applies them, while a cache layer holds one
codec, so ``CompressedCache`` refuses a plan with head tiers (:meth:`LayerPlan.layer_configs`).

Stages may come in any order; the canonical form puts the tiers first (grouped by layer, one
tier per distinct key/value pair, head tiers after layer tiers) and the base codec last, like a
policy before its codec, so a harness that appends ``,seed=N`` to a spec re-seeds the base codec. A tier codec
without its own ``seed`` takes the base codec's: one rotation seed per cache, so seed sweeps move
every layer. A (layer, role) named by two tiers, a layer past the model's last, or an unknown
codec is a one-line :class:`SpecError`.

The plan lives with the codecs because two consumers read it: the frontier harness
(:mod:`kvshrink.eval.layerwise`) and ``CompressedCache`` (:mod:`kvshrink.cache.config`).
Shared state (codebooks, rotations) of every codec a plan names is counted once, and a tensor
two codecs share (the rotation of one seed, a codebook) once (:func:`shared_parts`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.errors import SpecError
from ..core.spec import SpecConfig, build_config, parse_stage, split_stages
from .base import CODECS, Codec, CodecConfig, Role
from .rotated import RotatedCodec

__all__ = [
    "NAME",
    "LayerPlan",
    "LayersConfig",
    "format_layers",
    "is_layerwise",
    "merge_roles",
    "parse_layer_plan",
    "parse_layers",
    "shared_parts",
]

NAME = "layers"
_ROLES: tuple[Role, ...] = ("key", "value")


@dataclass(frozen=True)
class LayersConfig(SpecConfig):
    """One tier as written: the layers and the codec(s) it puts there (raw stage strings)."""

    name: ClassVar[str] = NAME
    at: str = ""
    codec: str | None = None
    key: str | None = None
    value: str | None = None
    heads: str | None = None

    def __post_init__(self) -> None:
        if not self.at:
            raise SpecError("layers: at= is required, e.g. layers:at=[0-1,29],codec=[fibquant:b=3,k=4]")
        if self.codec is None and self.key is None and self.value is None:
            raise SpecError(
                f"layers:at=[{self.at}] names no codec; give codec=[...], key=[...] or value=[...]"
            )
        if self.codec is not None and (self.key is not None or self.value is not None):
            raise SpecError("layers: codec= sets both roles; give it alone, or key= and/or value=")


def parse_layers(text: str, what: str = "at") -> tuple[int, ...]:
    """``"0-2,29"`` -> ``(0, 1, 2, 29)`` (sorted, unique), or a one-line SpecError."""
    out: set[int] = set()
    noun = "layer" if what == "at" else "head"
    for item in (x.strip() for x in text.split(",")):
        lo, dash, hi = item.partition("-")
        try:
            a = int(lo)
            b = int(hi) if dash else a
        except ValueError:
            raise SpecError(
                f"layers: bad {noun} {item!r} in {what}=[{text}]; expected e.g. {what}=[0-2,29]"
            ) from None
        if a < 0 or b < a:
            raise SpecError(f"layers: bad {noun} range {item!r} in {what}=[{text}]; expected 0 <= a <= b")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


def format_layers(layers: Sequence[int]) -> str:
    """Sorted layers back to text; runs of three or more print as ``a-b``."""
    xs, parts, i = sorted(set(layers)), [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{xs[i]}-{xs[j]}")
        else:
            parts.extend(str(x) for x in xs[i : j + 1])
        i = j + 1
    return ",".join(parts)


def _tier_codec(text: str, base: CodecConfig) -> CodecConfig:
    """A tier's codec, taking the base codec's seed unless it names its own."""
    stage = parse_stage(text)
    cfg = CODECS.config(stage)
    seeded = "seed" in dict(stage.options)
    if not seeded and hasattr(cfg, "seed") and hasattr(base, "seed"):
        cfg = dataclasses.replace(cfg, seed=base.seed)
    return cfg


def _codec_text(cfg: CodecConfig, base: CodecConfig) -> str:
    """Canonical text of a tier codec: its seed shown only where it differs from the base's."""
    if not hasattr(cfg, "seed"):
        return str(cfg)
    if hasattr(base, "seed") and cfg.seed == base.seed:
        return str(dataclasses.replace(cfg, seed=0))
    text = str(cfg)
    return text if "seed=" in text else f"{text},seed={cfg.seed}"


@dataclass(frozen=True)
class LayerPlan:
    """A base codec and its per-(layer, role) overrides; ``str()`` is the canonical spec."""

    base: CodecConfig
    overrides: tuple[tuple[int, Role, CodecConfig], ...]  # sorted, none equal to the base
    # (layer, role, KV head, codec): sorted, none equal to what the layer tiers give that head
    head_overrides: tuple[tuple[int, Role, int, CodecConfig], ...] = ()

    @property
    def max_layer(self) -> int:
        return max(
            [layer for layer, _, _ in self.overrides] + [layer for layer, _, _, _ in self.head_overrides],
            default=-1,
        )

    @property
    def max_head(self) -> int:
        return max((h for _, _, h, _ in self.head_overrides), default=-1)

    def configs(self) -> list[CodecConfig]:
        """Every distinct codec the plan names, base first."""
        seen: dict[str, CodecConfig] = {str(self.base): self.base}
        for _, _, cfg in self.overrides:
            seen.setdefault(str(cfg), cfg)
        for _, _, _, cfg in self.head_overrides:
            seen.setdefault(str(cfg), cfg)
        return list(seen.values())

    def assign_heads(self, n_layers: int, n_heads: int) -> list[dict[Role, list[CodecConfig]]]:
        """The codec of each KV head of each role of each layer: the layer's, then its head tiers."""
        if self.max_head >= n_heads:
            raise SpecError(
                f"layers: KV head {self.max_head} is out of range for a model with {n_heads} KV heads "
                f"(valid: 0-{n_heads - 1})"
            )
        out = [{r: [roles[r]] * n_heads for r in _ROLES} for roles in self.assign(n_layers)]
        for layer, role, head, cfg in self.head_overrides:
            out[layer][role][head] = cfg
        return out

    def assign(self, n_layers: int) -> list[dict[Role, CodecConfig]]:
        """The codec of each role of each of ``n_layers`` layers."""
        if self.max_layer >= n_layers:
            raise SpecError(
                f"layers: layer {self.max_layer} is out of range for a model with {n_layers} layers "
                f"(valid: 0-{n_layers - 1})"
            )
        out: list[dict[Role, CodecConfig]] = [dict.fromkeys(_ROLES, self.base) for _ in range(n_layers)]
        for layer, role, cfg in self.overrides:
            out[layer][role] = cfg
        return out

    def layer_configs(self, n_layers: int) -> list[CodecConfig]:
        """One codec per layer for both roles (:func:`merge_roles`), as a cache layer holds."""
        if self.head_overrides:
            raise SpecError(
                "layers: heads= tiers are a frontier plan; a cache layer holds one codec for all its "
                "heads, so give CompressedCache a plan without heads="
            )
        return [merge_roles(r["key"], r["value"], i) for i, r in enumerate(self.assign(n_layers))]

    def __str__(self) -> str:
        pairs: dict[int, dict[Role, CodecConfig]] = {}
        for layer, role, cfg in self.overrides:
            pairs.setdefault(layer, {})[role] = cfg
        groups: dict[tuple[str | None, str | None], list[int]] = {}
        for layer, roles in sorted(pairs.items()):
            k, v = (_codec_text(roles[r], self.base) if r in roles else None for r in _ROLES)
            groups.setdefault((k, v), []).append(layer)
        stages = []
        for (k, v), layers in sorted(groups.items(), key=lambda kv: kv[1][0]):
            opts = [f"codec=[{k}]"] if k == v else [f"{n}=[{t}]" for n, t in (("key", k), ("value", v)) if t]
            stages.append(f"{NAME}:at=[{format_layers(layers)}],{','.join(opts)}")
        return "+".join([*stages, *self._head_stages(), str(self.base)])

    def _head_stages(self) -> list[str]:
        """Head tiers, canonical: one stage per (key, value) pair and head set, over its layers."""
        pairs: dict[tuple[int, int], dict[Role, CodecConfig]] = {}
        for layer, role, head, cfg in self.head_overrides:
            pairs.setdefault((layer, head), {})[role] = cfg
        by_pair: dict[tuple[str | None, str | None], dict[int, list[int]]] = {}
        for (layer, head), roles in sorted(pairs.items()):
            k, v = (_codec_text(roles[r], self.base) if r in roles else None for r in _ROLES)
            by_pair.setdefault((k, v), {}).setdefault(layer, []).append(head)
        groups: dict[tuple[str | None, str | None, tuple[int, ...]], list[int]] = {}
        for (k, v), layers in by_pair.items():
            for layer, heads in layers.items():
                groups.setdefault((k, v, tuple(heads)), []).append(layer)
        stages = []
        for (k, v, heads), layers in sorted(groups.items(), key=lambda kv: (kv[1][0], kv[0][2])):
            opts = [f"codec=[{k}]"] if k == v else [f"{n}=[{t}]" for n, t in (("key", k), ("value", v)) if t]
            stages.append(
                f"{NAME}:at=[{format_layers(layers)}],heads=[{format_layers(heads)}],{','.join(opts)}"
            )
        return stages


_RATES = ("b", "n", "kb", "vb")  # the fields that only set a role's rate


def _role_levels(cfg: CodecConfig, role: Role) -> int | None:
    """Codebook size (or bits) a config spends on ``role``, for configs with per-role rates."""
    if hasattr(cfg, "levels_of"):  # FibQuant: N per role
        return cfg.levels_of(role)  # type: ignore[attr-defined]
    if hasattr(cfg, "bits"):  # TurboQuant: bits per role
        return cfg.bits(role)  # type: ignore[attr-defined]
    return None


def merge_roles(key: CodecConfig, value: CodecConfig, layer: int) -> CodecConfig:
    """One codec that codes keys as ``key`` and values as ``value`` do, or a one-line SpecError.

    Why: a cache layer holds one codec (its packed blocks, kernels and byte count assume it), so a
    plan that gives a layer's keys and values different codecs is served when they differ only in
    rate, through the codec's own ``kb``/``vb``; anything else (another family, another ``k``,
    centering on one role only) has no single-codec form.
    """
    if key == value:
        return key
    rest = [
        {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in _RATES}
        for c in (key, value)
    ]
    if type(key) is type(value) and "kb" in {f.name for f in dataclasses.fields(key)} and rest[0] == rest[1]:
        rate = "n" if getattr(key, "n", None) is not None else "b"
        kr = getattr(key, "kb", None) or getattr(key, rate)
        vr = getattr(value, "vb", None) or getattr(value, "b", None)
        if vr is None:  # FibQuant given by n: its rate is log2(n)/k
            vr = math.log2(_role_levels(value, "value") or 2) / value.k  # type: ignore[attr-defined]
        try:
            merged = dataclasses.replace(key, kb=kr if rate == "b" else None, vb=vr)
        except SpecError:
            merged = None
        if merged is not None and all(
            _role_levels(merged, r) == _role_levels(c, r) for r, c in (("key", key), ("value", value))
        ):
            return merged
    raise SpecError(
        f"layers: layer {layer} codes keys with {key} and values with {value}; a cache layer holds one "
        "codec, so its keys and values may differ only in rate (the codec's kb=/vb=)"
    )


def is_layerwise(spec: str) -> bool:
    """Whether ``spec`` has a ``layers`` stage (cheap: no codec is built)."""
    return any(parse_stage(s).name == NAME for s in split_stages(spec))


def parse_layer_plan(spec: str) -> LayerPlan:
    """Parse ``layers:...+...+CODEC`` into a :class:`LayerPlan` (one-line SpecErrors)."""
    tiers: list[Any] = []
    base: CodecConfig | None = None
    for text in split_stages(spec):
        stage = parse_stage(text)
        if stage.name == NAME:
            tiers.append(build_config(LayersConfig, stage))
        elif stage.name in CODECS:
            if base is not None:
                raise SpecError(
                    f"{spec!r}: more than one base codec; per-layer codecs go in layers:at=[..],codec=[..]"
                )
            base = CODECS.config(stage)
        else:
            CODECS.config(stage)  # raises: unknown codec, with the valid names
    if base is None:
        raise SpecError(f"{spec!r} has no base codec; add one, e.g. '{spec}+fibquant:b=2,k=4'")
    given: dict[tuple[int, Role], CodecConfig] = {}
    heads_given: dict[tuple[int, Role, int], CodecConfig] = {}
    for tier in tiers:
        roles = {"key": tier.codec or tier.key, "value": tier.codec or tier.value}
        heads = parse_layers(tier.heads, "heads") if tier.heads is not None else None
        for layer in parse_layers(tier.at):
            for role, text in roles.items():
                if text is None:
                    continue
                if heads is None:
                    if (layer, role) in given:
                        raise SpecError(
                            f"layers: layer {layer} {role}s are given twice in {spec!r}; name each once"
                        )
                    given[(layer, role)] = _tier_codec(text, base)
                    continue
                for head in heads:
                    if (layer, role, head) in heads_given:
                        raise SpecError(
                            f"layers: layer {layer} head {head} {role}s are given twice in {spec!r}; name each once"
                        )
                    heads_given[(layer, role, head)] = _tier_codec(text, base)
    order = {r: i for i, r in enumerate(_ROLES)}
    overrides = tuple(
        (layer, role, cfg)
        for (layer, role), cfg in sorted(given.items(), key=lambda kv: (kv[0][0], order[kv[0][1]]))
        if cfg != base
    )
    head_overrides = tuple(
        (layer, role, head, cfg)
        for (layer, role, head), cfg in sorted(
            heads_given.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])
        )
        if cfg != given.get((layer, role), base)
    )
    return LayerPlan(base, overrides, head_overrides)


def shared_parts(codec: Codec, d: int) -> dict[tuple[Any, ...], int]:
    """A codec's shared state as named parts, so that codecs holding the same tensor count it once.

    Why: tiers at other rates of the same family share the seeded rotation (and a codebook where
    two rates coincide); counting each codec whole would charge a per-layer plan ~16 KB per tier
    for a matrix the cache holds once. Rotations are named by (kind, d, seed), which is all
    ``make_rotation`` depends on; codebooks by their contents. Whatever else a codec holds
    (TurboQuant's QJL matrix) stays one part per codec. The parts of one codec sum to its
    ``shared_nbytes``.
    """
    total = codec.shared_nbytes(d)
    if not isinstance(codec, RotatedCodec):
        return {("codec", codec.spec): total}
    cfg = codec.config
    rot = codec.rotation(d).nbytes
    parts: dict[tuple[Any, ...], int] = {("rotation", cfg.rot, d, cfg.seed): rot}
    for role in _ROLES:
        book = codec.codebook(d, role).contiguous()
        digest = hashlib.sha256(book.numpy().tobytes()).hexdigest()
        parts[("codebook", tuple(book.shape), digest)] = book.numel() * book.element_size()
    rest = total - sum(parts.values())
    if rest:
        parts[("codec", codec.spec)] = rest
    return parts
