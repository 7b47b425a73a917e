import dataclasses

import pytest

from quantlab.quant.scheme import PER_CHANNEL, QuantScheme, parse_scheme

EXPECTED = {
    "w4a16-g128-asym": QuantScheme(4, 128, False, "rtn", 16),
    "w4a16-g32-sym": QuantScheme(4, 32, True, "rtn", 16),
    "w8a16-g128": QuantScheme(8, 128, False, "rtn", 16),
    "w4a16-g128-awq": QuantScheme(4, 128, False, "awq", 16),
    "w4a16-g128-gptq": QuantScheme(4, 128, False, "gptq", 16),
    "w8a8-smoothquant": QuantScheme(8, PER_CHANNEL, True, "smoothquant", 8),
    "w4a16-pc": QuantScheme(4, PER_CHANNEL, False, "rtn", 16),
    "w4a16-g64-sym-gptq": QuantScheme(4, 64, True, "gptq", 16),
    "w4a16-g256-asym-rtn": QuantScheme(4, 256, False, "rtn", 16),
}

CANONICAL = {
    "w4a16-g128-asym": "w4a16-g128-asym",
    "w4a16-g32-sym": "w4a16-g32-sym",
    "w8a16-g128": "w8a16-g128-asym",
    "w4a16-g128-awq": "w4a16-g128-asym-awq",
    "w4a16-g128-gptq": "w4a16-g128-asym-gptq",
    "w8a8-smoothquant": "w8a8-smoothquant",
    "w4a16-pc": "w4a16-pc-asym",
}


@pytest.mark.parametrize("text", sorted(EXPECTED))
def test_parse_and_round_trip(text):
    scheme = parse_scheme(text)
    assert scheme == EXPECTED[text]
    assert parse_scheme(str(scheme)) == scheme
    assert str(parse_scheme(str(scheme))) == str(scheme)


@pytest.mark.parametrize("text,canonical", sorted(CANONICAL.items()))
def test_canonical_spelling(text, canonical):
    assert str(parse_scheme(text)) == canonical


def test_frozen_and_properties():
    scheme = parse_scheme("w4a16-pc")
    assert scheme.per_channel and scheme.weight_only
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.bits = 8
    assert not parse_scheme("w8a8-smoothquant").weight_only


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("w4", "first part"),
        ("int4-g128", "first part"),
        ("w3a16-g128", "weight bits"),
        ("w4a16-g100", "group size"),
        ("w4a16-g128-fast", "unknown part 'fast'"),
        ("w4a16", "missing grouping"),
        ("w4a16-g128-g64", "more than one grouping"),
        ("w4a16-g128-sym-asym", "sym/asym"),
        ("w4a16-g128-awq-gptq", "more than one method"),
        ("w4a8-g128", "8-bit activations"),
        ("w4a8-smoothquant", "w8a8-smoothquant"),
        ("w8a8-g128-smoothquant", "per-channel symmetric"),
        ("w8a8-asym-smoothquant", "per-channel symmetric"),
        ("w4a32-g128", "activation bits"),
    ],
)
def test_errors_name_the_bad_part(text, message):
    with pytest.raises(ValueError, match=message):
        parse_scheme(text)
