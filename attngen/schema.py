"""The attention spec: frozen dataclasses, loading from YAML or a dict, and validation.

A spec is data, never code: YAML is read with ``yaml.safe_load`` and expressions are parsed
by :mod:`attngen.expr` against a whitelist.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import resources
from .errors import SpecError, UnsupportedError
from .expr import FUNCTIONS, RESERVED_NAMES, InputSignature, Parsed, bind_params, parse_expression

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
#: compile-time integers must stay well inside the kernels' int32 position arithmetic
MAX_INT_PARAM = 2**30
PARAM_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

#: Element types a runtime input may have, with the expression kind they read as.
INPUT_DTYPES = {
    "float32": "float",
    "float16": "float",
    "bfloat16": "float",
    "float64": "float",
    "int32": "int",
    "int64": "int",
    "bool": "bool",
}
#: Names a runtime input's shape may use, resolved from q, k and v at call time.
DIM_NAMES = ("B", "H", "H_KV", "T_Q", "T_KV", "D_QK", "D_V")

NORMALIZERS = ("softmax", "sigmoid", "linear")
PLANNED_NORMALIZERS: dict[str, str] = {}
#: Feature maps of linear attention (see :mod:`attngen.features`).
FEATURE_MAPS = ("identity", "elu1", "relu", "taylor2", "performer")
#: Feature maps whose kernel approximates ``exp(scale * q·k)`` and so read ``scale``.
SCALED_FEATURE_MAPS = ("taylor2", "performer")
REDRAW_POLICIES = ("never", "per_call")
FEATURE_MAP_KEYS = ("kind", "features", "seed", "redraw")
#: ``eps`` of a normalised linear spec when the spec leaves it null.
DEFAULT_EPS = 1e-6
RECOMPUTE_POLICIES = ("lse", "store_p", "full")
PLANNED_RECOMPUTE: dict[str, str] = {}
#: store_p keeps P only while T_Q * T_KV is at most this (16M pairs: 32 MiB per head in bf16)
STORE_P_LIMIT = 1 << 24
ALIGNS = ("bottom_right", "top_left")

BLOCK_SIZES = (16, 32, 64, 128, 256)
WARPS = (1, 2, 4, 8, 16)

SPEC_KEYS = (
    "name",
    "description",
    "params",
    "inputs",
    "mask",
    "score",
    "normalizer",
    "bias",
    "scale",
    "align",
    "tiles",
    "recompute",
    "store_p_limit",
    "feature_map",
    "normalize",
    "eps",
    "fast_tanh",
)
#: Keys only linear attention reads.
LINEAR_KEYS = ("feature_map", "normalize", "eps")


@dataclass(frozen=True)
class InputSpec:
    """A runtime tensor that expressions index, passed by keyword at call time.

    Attributes:
        name: the keyword, also the name used in expressions (``doc`` in ``doc[b, q]``).
        dtype: one of :data:`INPUT_DTYPES` (``float32``, ``int32``, ``bool``, ...).
        shape: one entry per dimension: a name from :data:`DIM_NAMES`, an int param's name,
            or a positive integer.
    """

    name: str
    dtype: str
    shape: tuple[str | int, ...]

    @property
    def along_positions(self) -> bool:
        """Whether a dimension runs along the sequence (``T_Q`` or ``T_KV``): per-token ids
        such as ``doc``, rather than per-sequence values such as lengths ``n[b]``."""
        return any(d in ("T_Q", "T_KV") for d in self.shape)

    @property
    def kind(self) -> str:
        return INPUT_DTYPES[self.dtype]


@dataclass(frozen=True)
class TileSpace:
    """Tile configurations to search: each field is a tuple of candidates."""

    block_q: tuple[int, ...] = (64, 128)
    block_kv: tuple[int, ...] = (32, 64, 128)
    num_warps: tuple[int, ...] = (4, 8)
    num_stages: tuple[int, ...] = (2, 3, 4)
    #: linear attention only: positions per chunk (a GPU call takes the first that fits)
    chunk: tuple[int, ...] = (64, 32, 16)


@dataclass(frozen=True)
class FeatureMap:
    """The feature map ``φ`` of linear attention, applied to every row of q and k.

    Attributes:
        kind: one of :data:`FEATURE_MAPS`: ``identity``, ``elu1`` (``elu(x) + 1``),
            ``relu``, ``taylor2`` (second-order Taylor expansion of ``exp``) or
            ``performer`` (FAVOR+ positive orthogonal random features).
        features: performer only: the number of random features ``m``.
        seed: performer only: the seed the random features are drawn from.
        redraw: performer only: ``never`` (one draw per op) or ``per_call`` (a new draw,
            seed ``seed + call index``, on every forward call).
    """

    kind: str
    features: int | None = None
    seed: int | None = None
    redraw: str | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """An attention variant, as data.

    Attributes:
        name: ``[a-z][a-z0-9_]*``; in ``specs/`` the file stem equals the name.
        description: one line on the variant and the model or paper it comes from.
        params: compile-time numbers by name (``window``, ``cap``); :func:`attngen.compile`
            may override them.
        inputs: runtime tensors that expressions index.
        mask: boolean expression of which keys a query sees; ``None`` means every key.
        score: expression of the scaled score ``s``; ``None`` means ``s``.
        normalizer: ``softmax`` or ``sigmoid`` (``o = sum_k sigmoid(score + bias) v_k``,
            Ramapuram et al., 2024, "Theory, Analysis, and Best Practices for Sigmoid
            Self-Attention").
        bias: sigmoid only: added to the score before the sigmoid; ``None`` means
            ``-log(T_KV)``, the paper's recommendation.
        scale: multiplier of ``q·k``; ``None`` means ``1/sqrt(D_QK)``.
        align: ``bottom_right`` (query row ``i`` at position ``i + T_KV - T_Q``) or
            ``top_left`` (at ``i``).
        tiles: the tile configurations to search.
        recompute: backward-pass policy: ``lse`` (store O and log-sum-exp, recompute P),
            ``store_p`` (also store P, in the inputs' dtype, when ``T_Q * T_KV`` is at most
            ``store_p_limit``; the backward reads it instead of recomputing it) or ``full``
            (store only the inputs; the backward reruns the forward first).
        store_p_limit: ``store_p`` only: the largest ``T_Q * T_KV`` whose P is stored
            (per batch and head); longer calls behave as ``lse``.
        feature_map: linear only: the feature map ``φ`` (:class:`FeatureMap`).
        normalize: linear only: divide by ``Σ φ(q)·φ(k) + eps`` (default true).
        eps: linear only, with ``normalize``: added to the denominator (default 1e-6).
        fast_tanh: compute every ``tanh`` of the score (and of its derivative in the
            backward; never a mask's) with the GPU's ``tanh.approx.f32`` when q, k and v are
            bfloat16 or float16, as FlashAttention does for soft-capping, instead of an
            exponential and a division.
            Its relative error is at most 2^-10.9 (PTX ISA), so a soft-capped score
            ``cap * tanh(s / cap)`` is off by at most ``cap * 2^-10.9`` (0.016 at cap 30) and
            each weight ``p`` by a factor within ``exp(±cap * 2^-10.9)``. float32 inputs and
            Triton's interpreter keep the exact formula. Default false (also for null).
    """

    name: str
    description: str = ""
    params: tuple[tuple[str, int | float], ...] = ()
    inputs: tuple[InputSpec, ...] = ()
    mask: str | None = None
    score: str | None = None
    normalizer: str = "softmax"
    bias: float | None = None
    scale: float | None = None
    align: str = "bottom_right"
    tiles: TileSpace = field(default_factory=TileSpace)
    recompute: str = "lse"
    store_p_limit: int = STORE_P_LIMIT
    feature_map: FeatureMap | None = None
    normalize: bool | None = None
    eps: float | None = None
    fast_tanh: bool = False

    @property
    def param_values(self) -> dict[str, int | float]:
        return dict(self.params)

    @property
    def input_signatures(self) -> dict[str, InputSignature]:
        return {i.name: InputSignature(len(i.shape), i.kind) for i in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, in the YAML layout."""
        data = {
            "name": self.name,
            "description": self.description,
            "params": dict(self.params),
            "inputs": {i.name: {"dtype": i.dtype, "shape": list(i.shape)} for i in self.inputs},
            "mask": self.mask,
            "score": self.score,
            "normalizer": self.normalizer,
            "bias": self.bias,
            "scale": self.scale,
            "align": self.align,
            "tiles": {f.name: list(getattr(self.tiles, f.name)) for f in fields(TileSpace)},
            "recompute": self.recompute,
            "store_p_limit": self.store_p_limit,
        }
        if self.fast_tanh is not False:  # added later: specs without it hash as before
            data["fast_tanh"] = self.fast_tanh
        if self.normalizer != "linear":  # keys added for linear attention: other specs hash as before
            del data["tiles"]["chunk"]
            return data
        fm = self.feature_map
        data["feature_map"] = None if fm is None else {k: getattr(fm, k) for k in FEATURE_MAP_KEYS if getattr(fm, k) is not None}
        data["normalize"] = self.normalize
        data["eps"] = self.eps
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """A hash of everything that changes the generated kernels (not the description)."""
        data = self.to_dict()
        data.pop("description")
        if data["bias"] is None:  # keys added later hash as before while unset
            data.pop("bias")
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def parsed_mask(self) -> Parsed | None:
        if self.mask is None:
            return None
        return parse_expression(
            self.mask, field="mask", params=self.param_values, inputs=self.input_signatures, allow_score=False
        )

    def parsed_score(self) -> Parsed | None:
        if self.score is None:
            return None
        return parse_expression(
            self.score, field="score", params=self.param_values, inputs=self.input_signatures, allow_score=True
        )


    def constant_reads(self) -> list[tuple[str, int, int]]:
        """``(input, dimension, index)`` of every runtime-input read at a constant index."""
        import sympy

        out = []
        for parsed in (self.parsed_mask(), self.parsed_score()):
            if parsed is None:
                continue
            for item in bind_params(parsed.sym, self.param_values).atoms(sympy.Indexed):
                out += [(item.base.name, d, int(i)) for d, i in enumerate(item.indices) if i.is_Integer]
        return out


# ----------------------------------------------------------------------------------------
# loading


def load_spec(source: str | Path | Mapping[str, Any] | AttentionSpec) -> AttentionSpec:
    """Load and validate a spec.

    Args:
        source: a path to a YAML file, the name of a spec in the zoo (``"causal"``), a dict
            with the YAML's keys, or an :class:`AttentionSpec`.

    Returns:
        The validated spec.

    Raises:
        SpecError: the file is missing or not YAML, or a field is malformed (the message
            names the field path and the offending value).
        UnsupportedError: the spec asks for a normaliser or recompute policy not built yet.
    """
    if isinstance(source, AttentionSpec):
        return validate(source)
    if isinstance(source, Mapping):
        return validate(from_dict(source))
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists() and isinstance(source, str) and NAME_RE.match(source):
            zoo = resources.zoo_dir() / f"{source}.yaml"
            if zoo.is_file():
                path = zoo
            else:
                names = sorted(p.stem for p in resources.zoo_dir().glob("*.yaml"))
                raise SpecError("spec", f"no file {source!r} and no zoo spec of that name; {_closest(source, names)}"
                                        f"zoo specs: {', '.join(names)}")
        if not path.is_file():
            raise SpecError("spec", f"no such spec file: {str(path)!r}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SpecError("spec", f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise SpecError("spec", f"{path} must hold a mapping of spec keys, got {type(data).__name__}")
        data = dict(data)
        data.setdefault("name", path.stem)
        return validate(from_dict(data))
    raise SpecError("spec", f"expected a path, a dict or an AttentionSpec, got {type(source).__name__}")


def _closest(word: Any, known) -> str:
    """``did you mean 'x'? `` for the known name closest to ``word``, or "" if none is near."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _unknown_key(key: Any, known) -> str:
    """The message for an unknown key: the closest known key if one is near, then all of them."""
    return f"unknown key; {_closest(key, known)}known keys: {', '.join(sorted(str(k) for k in known))}"


def from_dict(data: Mapping[str, Any]) -> AttentionSpec:
    """Build an (unvalidated) spec from YAML-layout data; type errors raise :class:`SpecError`."""
    unknown = [key for key in data if key not in SPEC_KEYS]
    if unknown:
        raise SpecError(str(unknown[0]), _unknown_key(unknown[0], SPEC_KEYS))
    if "name" not in data:
        raise SpecError("name", "missing; every spec needs a name like 'my_variant'")
    params = data.get("params") or {}
    if not isinstance(params, Mapping):
        raise SpecError("params", f"expected a mapping of name: number, got {params!r}")
    inputs_data = data.get("inputs") or {}
    if not isinstance(inputs_data, Mapping):
        raise SpecError("inputs", f"expected a mapping of name: {{dtype, shape}}, got {inputs_data!r}")
    inputs = []
    for name, decl in inputs_data.items():
        where = f"inputs.{name}"
        if not isinstance(decl, Mapping):
            raise SpecError(where, f"expected {{dtype: ..., shape: [...]}}, got {decl!r}")
        extra = [key for key in decl if key not in ("dtype", "shape")]
        if extra:
            raise SpecError(f"{where}.{extra[0]}", "unknown key; an input has 'dtype' and 'shape'")
        if "shape" not in decl:
            raise SpecError(f"{where}.shape", "missing; give one entry per dimension, e.g. [B, T_KV]")
        shape = decl["shape"]
        if not isinstance(shape, (list, tuple)):
            raise SpecError(f"{where}.shape", f"expected a list like [B, T_KV], got {shape!r}")
        dtype = decl.get("dtype", "float32")
        if not isinstance(dtype, str):
            raise SpecError(f"{where}.dtype", f"expected a dtype name such as int32, got {dtype!r}")
        for dim in shape:
            if not isinstance(dim, (str, int)):
                raise SpecError(f"{where}.shape", f"dimension {dim!r} must be a name like T_KV or an integer")
        inputs.append(InputSpec(str(name), dtype, tuple(shape)))
    tiles_data = data.get("tiles") or {}
    if not isinstance(tiles_data, Mapping):
        raise SpecError("tiles", f"expected a mapping like {{block_q: [64, 128]}}, got {tiles_data!r}")
    tile_fields = {f.name for f in fields(TileSpace)}
    tiles = {}
    for key, value in tiles_data.items():
        if key not in tile_fields:
            raise SpecError(f"tiles.{key}", _unknown_key(key, tile_fields))
        values = value if isinstance(value, (list, tuple)) else [value]
        tiles[key] = tuple(values)
    def get(key: str, default):
        value = data.get(key)
        return default if value is None else value

    feature_map = data.get("feature_map")
    if isinstance(feature_map, str):
        feature_map = FeatureMap(feature_map)
    elif isinstance(feature_map, Mapping):
        extra = [key for key in feature_map if key not in FEATURE_MAP_KEYS]
        if extra:
            raise SpecError(f"feature_map.{extra[0]}", _unknown_key(extra[0], FEATURE_MAP_KEYS))
        if "kind" not in feature_map:
            raise SpecError("feature_map.kind", f"missing; one of {', '.join(FEATURE_MAPS)}")
        feature_map = FeatureMap(**{k: feature_map.get(k) for k in FEATURE_MAP_KEYS})
    elif feature_map is not None:
        raise SpecError("feature_map", f"expected a name such as elu1 or a mapping {{kind: performer, features: 64}}, got {feature_map!r}")

    return AttentionSpec(
        name=data["name"],
        description=get("description", ""),
        params=tuple(params.items()),
        inputs=tuple(inputs),
        mask=data.get("mask"),
        score=data.get("score"),
        normalizer=get("normalizer", "softmax"),
        bias=data.get("bias"),
        scale=data.get("scale"),
        align=get("align", "bottom_right"),
        tiles=TileSpace(**tiles),
        recompute=get("recompute", "lse"),
        store_p_limit=get("store_p_limit", STORE_P_LIMIT),
        feature_map=feature_map,
        normalize=data.get("normalize"),
        eps=data.get("eps"),
        fast_tanh=False if data.get("fast_tanh") is None else data["fast_tanh"],
    )


# ----------------------------------------------------------------------------------------
# validation


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(spec: AttentionSpec) -> AttentionSpec:
    """Check every field of a spec and parse its expressions; return it unchanged.

    Raises:
        SpecError: naming the first malformed field and how to fix it.
        UnsupportedError: a normaliser or recompute policy that is planned but not built.
    """
    if not isinstance(spec.name, str) or not NAME_RE.match(spec.name):
        raise SpecError("name", f"{spec.name!r} must match [a-z][a-z0-9_]* (lower case, digits, underscores; at most 64 characters)")
    if not isinstance(spec.description, str):
        raise SpecError("description", f"expected text, got {spec.description!r}")
    seen: set[str] = set()
    for name, value in spec.params:
        where = f"params.{name}"
        if not isinstance(name, str) or not PARAM_RE.match(name):
            raise SpecError(where, "param names are identifiers like 'window'")
        if name in RESERVED_NAMES or name in FUNCTIONS or name in DIM_NAMES:
            raise SpecError(where, f"{name!r} is a reserved name; pick another")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_INT_PARAM:
            raise SpecError(where, f"{value} is too large: integer params must lie within ±2^30 (positions are 32-bit in the kernels)")
        if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            hint = ""
            if isinstance(value, str):
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
            raise SpecError(where, f"expected a finite number, got {value!r}{hint}")
        seen.add(name)
    int_params = {n for n, v in spec.params if isinstance(v, int)}
    for inp in spec.inputs:
        where = f"inputs.{inp.name}"
        if not PARAM_RE.match(inp.name) or inp.name in RESERVED_NAMES or inp.name in FUNCTIONS or inp.name in DIM_NAMES:
            raise SpecError(where, "input names are identifiers that are not reserved (q, k, b, h, s, ...)")
        if inp.name in seen:
            raise SpecError(where, f"{inp.name!r} is already a param; names must be unique")
        seen.add(inp.name)
        if inp.dtype not in INPUT_DTYPES:
            raise SpecError(f"{where}.dtype", f"{inp.dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        if not inp.shape:
            raise SpecError(f"{where}.shape", "an input needs at least one dimension")
        for dim in inp.shape:
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0) or dim in DIM_NAMES or dim in int_params
            if not ok:
                raise SpecError(
                    f"{where}.shape",
                    f"dimension {dim!r} must be a positive integer, an int param, or one of {', '.join(DIM_NAMES)}",
                )
    if spec.mask is not None:
        parsed = spec.parsed_mask()
        if parsed.kind != "bool":
            raise SpecError("mask", f"{spec.mask!r} is a number, not a condition; write e.g. 'k <= q'")
    if spec.score is not None:
        parsed = spec.parsed_score()
        if parsed.kind == "bool":
            raise SpecError("score", f"{spec.score!r} is a condition; the score is a number such as 's + 1.0'")
    for field_name, parsed in (("mask", spec.parsed_mask()), ("score", spec.parsed_score())):
        if parsed is not None:
            _check_divisors(field_name, parsed.sym, spec.param_values)
            _check_finite(field_name, parsed.sym, spec.param_values)
    if spec.normalizer in PLANNED_NORMALIZERS:
        raise UnsupportedError(
            f"normalizer: {spec.normalizer!r} is not implemented yet ({PLANNED_NORMALIZERS[spec.normalizer]}); "
            "use 'softmax'"
        )
    if spec.normalizer not in NORMALIZERS:
        raise SpecError("normalizer", f"{spec.normalizer!r} is not one of {', '.join(NORMALIZERS)}")
    if not isinstance(spec.fast_tanh, bool):
        raise SpecError("fast_tanh", f"expected true or false, got {spec.fast_tanh!r}")
    if spec.fast_tanh:
        import sympy

        score = spec.parsed_score()
        if score is None or not score.sym.has(sympy.tanh):
            raise SpecError("fast_tanh", "the score has no tanh to approximate; remove fast_tanh, or soft-cap the score "
                            "with tanh (e.g. score: 'cap * tanh(s / cap)')")
    if spec.normalizer == "linear":
        _validate_linear(spec)
    else:
        for key in LINEAR_KEYS:
            if getattr(spec, key) is not None:
                raise SpecError(key, f"only the linear normalizer reads {key}; remove it or set normalizer: linear")
        if spec.tiles.chunk != TileSpace().chunk:
            raise SpecError("tiles.chunk", "only the linear normalizer has chunks; remove it or set normalizer: linear")
    if spec.bias is not None:
        if spec.normalizer != "sigmoid":
            raise SpecError("bias", "only the sigmoid normalizer takes a bias; put a softmax bias in 'score'")
        if not _is_number(spec.bias) or not math.isfinite(spec.bias):
            raise SpecError("bias", f"expected null (-log(T_KV)) or a finite number, got {spec.bias!r}")
    if spec.scale is not None and (not _is_number(spec.scale) or not math.isfinite(spec.scale) or spec.scale <= 0):
        raise SpecError("scale", f"expected null (1/sqrt(D_QK)) or a positive number, got {spec.scale!r}")
    if spec.align not in ALIGNS:
        raise SpecError("align", f"{spec.align!r} is not one of {', '.join(ALIGNS)}")
    if spec.recompute in PLANNED_RECOMPUTE:
        raise UnsupportedError(
            f"recompute: {spec.recompute!r} is not implemented yet ({PLANNED_RECOMPUTE[spec.recompute]}); use 'lse'"
        )
    if spec.recompute not in RECOMPUTE_POLICIES:
        raise SpecError("recompute", f"{spec.recompute!r} is not one of {', '.join(RECOMPUTE_POLICIES)}")
    if isinstance(spec.store_p_limit, bool) or not isinstance(spec.store_p_limit, int) or spec.store_p_limit < 1:
        raise SpecError("store_p_limit", f"expected a positive integer count of (query, key) pairs, got {spec.store_p_limit!r}")
    if spec.store_p_limit != STORE_P_LIMIT and spec.recompute != "store_p":
        raise SpecError("store_p_limit", f"applies to recompute: store_p only (this spec has {spec.recompute!r}); drop it")
    if spec.recompute == "store_p" and spec.normalizer != "softmax":
        raise UnsupportedError(f"recompute: store_p with normalizer {spec.normalizer!r}: P is stored for softmax only; "
                               "use 'lse'")
    _validate_tiles(spec.tiles)
    return spec


def _validate_linear(spec: AttentionSpec) -> None:
    """The fields of a linear-attention spec: feature map, normalisation, mask form, and the
    fields linear attention has no use for."""
    fm = spec.feature_map
    kinds = ", ".join(FEATURE_MAPS)
    if fm is None:
        raise SpecError("feature_map", f"missing; linear attention needs a feature map, one of {kinds} (e.g. feature_map: elu1)")
    if fm.kind not in FEATURE_MAPS:
        raise SpecError("feature_map.kind", f"{fm.kind!r} is not one of {kinds}")
    if fm.kind == "performer":
        if isinstance(fm.features, bool) or not isinstance(fm.features, int) or not 1 <= fm.features <= 256:
            raise SpecError("feature_map.features", f"performer needs the number of random features, an integer from 1 to 256; got {fm.features!r}")
        if fm.seed is not None and (isinstance(fm.seed, bool) or not isinstance(fm.seed, int) or not 0 <= fm.seed < 2**31):
            raise SpecError("feature_map.seed", f"expected an integer from 0 to 2^31 - 1 (null means 0), got {fm.seed!r}")
        if fm.redraw is not None and fm.redraw not in REDRAW_POLICIES:
            raise SpecError("feature_map.redraw", f"{fm.redraw!r} is not one of {', '.join(REDRAW_POLICIES)}")
    else:
        for key in ("features", "seed", "redraw"):
            if getattr(fm, key) is not None:
                raise SpecError(f"feature_map.{key}", f"only the performer feature map takes {key}; remove it")
    if spec.normalize is not None and not isinstance(spec.normalize, bool):
        raise SpecError("normalize", f"expected true or false, got {spec.normalize!r}")
    if spec.eps is not None:
        if spec.normalize is False:
            raise SpecError("eps", "eps is added to the denominator, and normalize: false has none; remove eps")
        if not _is_number(spec.eps) or not math.isfinite(spec.eps) or spec.eps <= 0:
            hint = " (YAML reads 1e-6 as text: write 1.0e-6)" if isinstance(spec.eps, str) else ""
            raise SpecError("eps", f"expected a positive number (null means {DEFAULT_EPS}), got {spec.eps!r}{hint}")
    if spec.score is not None:
        raise SpecError("score", "linear attention has no score to modify (it never forms q·k scores); remove score")
    if spec.bias is not None:
        raise SpecError("bias", "only the sigmoid normalizer takes a bias; remove it")
    if spec.scale is not None and fm.kind not in SCALED_FEATURE_MAPS:
        raise SpecError("scale", f"the {fm.kind} feature map reads q and k unscaled; remove scale (taylor2 and performer take one)")
    if spec.recompute != "lse":
        raise SpecError("recompute", "linear attention always saves q, k, v, o and the denominator; remove recompute")
    if spec.inputs:
        raise SpecError("inputs", "linear attention reads no runtime inputs (its mask is null, causal or chunk-local); remove inputs")
    for value in spec.tiles.chunk:
        if isinstance(value, bool) or value not in BLOCK_SIZES:
            raise SpecError("tiles.chunk", f"{value!r} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    linear_mask_form(spec)


def linear_mask_form(spec: AttentionSpec) -> tuple[bool, int]:
    """The mask of a linear spec as ``(causal, local)``: ``(False, 0)`` for ``null``,
    ``(True, 0)`` for ``k <= q`` and ``(True, W)`` for the chunk-local causal mask
    ``q // W == k // W and k <= q``.

    Raises:
        UnsupportedError: any other mask, naming the normaliser and the mask.
    """
    import sympy

    from .expr import FloorDiv, SYMBOLS

    if spec.mask is None:
        return False, 0
    expr = bind_params(spec.parsed_mask().sym, spec.param_values)
    q, k = SYMBOLS["q"], SYMBOLS["k"]
    atoms = list(expr.args) if isinstance(expr, sympy.And) else [expr]
    causal, local = False, 0
    for atom in atoms:
        if atom is sympy.true:
            continue
        if isinstance(atom, sympy.Rel) and atom.rel_op in ("<=", "<", ">=", ">"):
            small, big = (atom.lhs, atom.rhs) if atom.rel_op in ("<=", "<") else (atom.rhs, atom.lhs)
            gap = sympy.expand(big - small) - (1 if atom.rel_op in ("<", ">") else 0)  # small <= big - ...
            if sympy.expand(gap - (q - k)) == 0:  # k <= q
                causal = True
                continue
        if isinstance(atom, sympy.Eq):
            sides = {atom.lhs, atom.rhs}
            if all(isinstance(x, FloorDiv) for x in sides):
                widths = {x.args[1] for x in sides}
                if {x.args[0] for x in sides} == {q, k} and len(widths) == 1:
                    (width,) = widths
                    if width.is_Integer and int(width) >= 1:
                        local = int(width)
                        continue
        local = -1
        break
    if local == -1 or (local and not causal):
        raise UnsupportedError(
            f"mask: normalizer 'linear' cannot honour the mask {spec.mask!r}: linear attention carries one state "
            "along the sequence, so it supports only mask: null (non-causal), 'k <= q' (causal) and "
            "'q // W == k // W and k <= q' (chunk-local causal); use one of those or normalizer: softmax"
        )
    return causal, local


def _check_divisors(field_name: str, expr, params: Mapping[str, int | float]) -> None:
    """Reject ``//``, ``%`` or ``/`` by a param whose value is 0, and integer ``//`` or ``%``
    by a constant past ±2^30 (the kernels compute them in int32 through ``a % d + d``)."""
    import sympy

    from .expr import FloorDiv

    for node in sympy.preorder_traversal(expr):
        divisor = None
        if isinstance(node, (FloorDiv, sympy.Mod)):
            divisor = node.args[1]
            value = bind_params(divisor, params)
            if value.is_Integer and abs(int(value)) > 2**30:
                raise SpecError(field_name, f"{'//' if isinstance(node, FloorDiv) else '%'} by {value}: the kernels compute "
                                "it in 32-bit integers, which hold divisors up to 2^30 = 1073741824; use a smaller one")
        elif isinstance(node, sympy.Pow) and node.exp.is_negative:
            divisor = node.base
        if divisor is not None and divisor.free_symbols:
            try:
                value = bind_params(divisor, params)
            except ZeroDivisionError:
                value = sympy.Integer(0)
            if value.is_zero:
                raise SpecError(field_name, f"divides by {divisor} = 0 with params {dict(params)}; give it a nonzero value")


def _check_finite(field_name: str, expr, params: Mapping[str, int | float]) -> None:
    """Reject expressions whose constants fold to infinity, NaN or complex numbers
    (``exp(1000.0)``, ``sqrt(-1.0)``, ``log(0.0)``) or to integers past 32 bits."""
    import sympy

    bound = bind_params(expr, params)
    if bound.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan, sympy.I):
        raise SpecError(field_name, "a constant part folds to infinity, NaN or a complex number; change the expression or params")
    for number in bound.atoms(sympy.Number):
        if number.is_Float and not math.isfinite(float(number)):
            raise SpecError(field_name, f"the constant {number} overflows float32 arithmetic; change the expression or params")
        if number.is_Integer and abs(int(number)) >= 2**31:
            raise SpecError(field_name, f"the constant {number} does not fit the kernels' 32-bit integer arithmetic")


def _validate_tiles(tiles: TileSpace) -> None:
    allowed = {
        "block_q": BLOCK_SIZES,
        "block_kv": BLOCK_SIZES,
        "num_warps": WARPS,
        "num_stages": tuple(range(1, 9)),
    }
    for name, legal in allowed.items():
        values = getattr(tiles, name)
        if not values:
            raise SpecError(f"tiles.{name}", "needs at least one candidate")
        for v in values:
            if isinstance(v, bool) or v not in legal:
                raise SpecError(f"tiles.{name}", f"{v!r} is not one of {', '.join(map(str, legal))}")


def with_params(spec: AttentionSpec, overrides: Mapping[str, Any]) -> AttentionSpec:
    """Return ``spec`` with some params replaced, keeping each param's int/float type.

    Raises:
        SpecError: an unknown param (the message lists the known ones) or a value of the
            wrong type (a float for an int param).
    """
    if not overrides:
        return spec
    values = spec.param_values
    for name, value in overrides.items():
        if name not in values:
            known = ", ".join(values) or "(none)"
            raise SpecError(f"params.{name}", f"unknown param; the spec's params are: {known}")
        if not _is_number(value):
            raise SpecError(f"params.{name}", f"expected a number, got {value!r}")
        if isinstance(values[name], int) and not isinstance(value, int):
            if float(value).is_integer():
                value = int(value)
            else:
                raise SpecError(f"params.{name}", f"is an integer param; got {value!r}")
        elif isinstance(values[name], float):
            value = float(value)
        values[name] = value
    return validate(replace(spec, params=tuple(values.items())))
