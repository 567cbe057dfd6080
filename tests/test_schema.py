"""Spec loading and validation: the zoo, YAML files, dicts, and the errors for bad fields."""

from pathlib import Path

import pytest

import attngen
from attngen import SpecError, load_spec
from attngen.schema import with_params

ZOO = sorted((Path(__file__).resolve().parent.parent / "specs").glob("*.yaml"))
REQUIRED_ZOO = {
    "dense", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap",
    "gemma2_local", "longformer", "strided", "dilated_window", "chunked", "streaming_sinks", "llama3_gqa",
}  # fmt: skip


def test_zoo_holds_every_required_spec():
    assert REQUIRED_ZOO <= {p.stem for p in ZOO}


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_zoo_spec_loads_and_its_stem_is_its_name(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == path.stem
    spec = load_spec(path)
    assert spec.name == path.stem
    assert spec.description.strip(), "every zoo spec says where it comes from"
    assert load_spec(path.stem) == spec  # by zoo name too


def test_gemma2_local_has_every_key_of_the_contract():
    spec = load_spec("gemma2_local")
    assert spec.param_values == {"window": 4096, "cap": 50.0}
    assert spec.tiles.block_kv == (32, 64, 128)
    assert spec.recompute == "lse" and spec.align == "bottom_right" and spec.scale is None


def test_yaml_file_round_trip(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("description: test\nparams: {w: 3}\nmask: 'q - k < w'\n")
    spec = load_spec(f)
    assert spec.name == "mine"
    assert load_spec(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"name": "Bad-Name"}, "name", "must match"),
        ({"name": "x", "maks": "k <= q"}, "maks", "unknown key; did you mean 'mask'? known keys"),
        ({"name": "x", "normaliser": "sigmoid"}, "normaliser", "did you mean 'normalizer'?"),
        ({"name": "x", "zzz": 1}, "zzz", "unknown key; known keys: align"),
        ({"name": "x", "params": {"q": 3}}, "params.q", "reserved"),
        ({"name": "x", "params": {"w": "big"}}, "params.w", "finite number"),
        ({"name": "x", "params": {"w": True}}, "params.w", "finite number"),
        ({"name": "x", "tiles": {"block_q": [48]}}, "tiles.block_q", "is not one of"),
        ({"name": "x", "tiles": {"blk": [64]}}, "tiles.blk", "unknown key"),
        ({"name": "x", "tiles": {"blockq": [64]}}, "tiles.blockq", "did you mean 'block_q'?"),
        ({"name": "x", "scale": -1}, "scale", "positive number"),
        ({"name": "x", "align": "left"}, "align", "is not one of"),
        ({"name": "x", "normalizer": "relu"}, "normalizer", "is not one of"),
        ({"name": "x", "inputs": {"doc": {"dtype": "int33", "shape": ["B"]}}}, "inputs.doc.dtype", "is not one of"),
        ({"name": "x", "inputs": {"doc": {"dtype": "int32", "shape": ["T"]}}}, "inputs.doc.shape", "dimension 'T'"),
        ({"name": "x", "inputs": {"doc": {"dtype": "int32"}}}, "inputs.doc.shape", "missing"),
    ],
)
def test_bad_fields_name_the_field(data, field, message):
    with pytest.raises(SpecError) as info:
        load_spec(data)
    assert info.value.field == field
    assert message in str(info.value)


def test_missing_file_and_unknown_zoo_name():
    with pytest.raises(SpecError, match="zoo specs: .*causal"):
        load_spec("no_such_spec")
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec("/nonexistent/x.yaml")


def test_store_p_and_linear_specs_load_with_their_defaults():
    assert load_spec({"name": "x", "recompute": "store_p"}).store_p_limit == 1 << 24
    linear = load_spec({"name": "x", "normalizer": "linear", "feature_map": "elu1", "mask": "k <= q"})
    assert linear.normalizer == "linear" and linear.feature_map.kind == "elu1"


def test_param_overrides_keep_types():
    spec = load_spec("sliding_window")
    assert with_params(spec, {"window": 1024}).param_values["window"] == 1024
    assert with_params(spec, {"window": 1024.0}).param_values["window"] == 1024
    with pytest.raises(SpecError, match="integer param"):
        with_params(spec, {"window": 10.5})
    with pytest.raises(SpecError, match="params are: window"):
        attngen.compile(spec, widow=3)
    softcap = with_params(load_spec("softcap"), {"cap": 30})
    assert softcap.param_values["cap"] == 30.0 and isinstance(softcap.param_values["cap"], float)


def test_digest_ignores_description_but_not_mask():
    a = load_spec({"name": "x", "mask": "k <= q", "description": "one"})
    b = load_spec({"name": "x", "mask": "k <= q", "description": "two"})
    c = load_spec({"name": "x", "mask": "k < q"})
    assert a.digest() == b.digest() != c.digest()


def test_division_by_a_zero_param_is_a_spec_error():
    for mask in ("q % d == 0", "q // d == k // d", "q / d < 3"):
        with pytest.raises(SpecError, match="divides by d = 0"):
            load_spec({"name": "x", "params": {"d": 0}, "mask": mask})


def test_integer_division_by_a_constant_past_two_to_the_30_is_a_spec_error():
    # the kernels compute a % d as (a % d + d) % d in int32, which wraps for larger divisors
    for mask in ("(q - k) % 2147483647 == 0", "q // 2000000000 == k // 2000000000"):
        with pytest.raises(SpecError, match="divisors up to 2\\^30"):
            load_spec({"name": "x", "mask": mask})
    load_spec({"name": "x", "mask": "q // 1073741824 == k // 1073741824"})


@pytest.mark.parametrize(
    "mask, fix",
    [("(k <= q) & (q - k < 8)", "'and'"), ("(k <= q) | (k < 4)", "'or'"), ("~(k > q)", "'not'"), ("k <= q && k > 2", "'and'")],
)
def test_flex_attention_style_masks_are_told_the_words_to_use(mask, fix):
    # FlexAttention's mask_mod joins tensor conditions with & | ~; specs use and / or / not
    with pytest.raises(SpecError, match=fix):
        load_spec({"name": "x", "mask": mask})


def test_a_misspelt_zoo_name_suggests_the_closest():
    with pytest.raises(SpecError, match="did you mean 'sliding_window'"):
        load_spec("sliding_windw")
