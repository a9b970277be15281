import json

import pytest

from deepshift import PSConfig, QConfig, config_from_dict

PAPER_RANGES = {  # the paper's ranges: weight_bits -> (Q range, PS range)
    5: ((-15, 0), (-14, 0)),
    4: ((-7, 0), (-6, 0)),
    3: ((-3, 0), (-2, 0)),
    2: ((-1, 0), (0, 0)),
}


@pytest.mark.parametrize("bits", sorted(PAPER_RANGES))
def test_shift_ranges_match_the_paper(bits):
    q_range, ps_range = PAPER_RANGES[bits]
    assert QConfig(weight_bits=bits).shift_range == q_range
    assert PSConfig(weight_bits=bits).shift_range == ps_range


@pytest.mark.parametrize("bits", range(2, 9))
def test_ranges_fill_exactly_weight_bits(bits):
    lo, hi = QConfig(weight_bits=bits).shift_range
    assert 2 * (hi - lo + 1) == 2**bits  # two signs times every shift
    lo, hi = PSConfig(weight_bits=bits).shift_range
    assert 2 * (hi - lo + 1) + 1 <= 2**bits  # plus a zero code
    assert 2 * (hi - lo + 2) + 1 > 2**bits  # one more shift value would not fit


def test_max_shift_raises_the_range():
    assert QConfig(weight_bits=5, max_shift=3).shift_range == (-12, 3)
    assert PSConfig(weight_bits=3, max_shift=-1).shift_range == (-3, -1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"weight_bits": 5.0}, "weight_bits"),
        ({"weight_bits": True}, "weight_bits"),
        ({"rounding": "nearest"}, "rounding"),
        ({"act_bits": (0, 4)}, "act_bits[0]"),
        ({"act_bits": (3, -1)}, "act_bits[1]"),
        ({"act_bits": (20, 20)}, "act_bits"),
        ({"act_bits": 8}, "act_bits"),
        ({"act_bits": (1, 2, 3)}, "act_bits"),
        ({"max_shift": 17}, "max_shift"),
        ({"act_rounding": "ceil"}, "act_rounding"),
    ],
)
def test_bad_values_name_the_field(kwargs, field):
    for cls in (QConfig, PSConfig):
        with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
            cls(**kwargs)


def test_bad_values_list_the_allowed_ones():
    with pytest.raises(ValueError, match="deterministic, stochastic"):
        QConfig(rounding="up")
    with pytest.raises(ValueError, match="2..8"):
        PSConfig(weight_bits=12)
    with pytest.raises(ValueError, match="freeze_sign"):
        PSConfig(freeze_sign="yes")


@pytest.mark.parametrize(
    "cfg",
    [QConfig(), QConfig(weight_bits=3, rounding="stochastic", act_bits=(3, 5), max_shift=2),
     PSConfig(), PSConfig(weight_bits=2, act_bits=[1, 7], freeze_sign=True, act_rounding="floor")],
)
def test_json_round_trip(cfg):
    text = json.dumps(cfg.to_dict())
    back = config_from_dict(json.loads(text))
    assert back == cfg and type(back) is type(cfg)


def test_act_bits_normalised_to_tuple_and_config_is_immutable():
    cfg = QConfig(act_bits=[3, 5])
    assert cfg.act_bits == (3, 5)
    with pytest.raises(AttributeError):
        cfg.weight_bits = 4  # type: ignore[misc]


def test_from_dict_rejects_unknown_fields_and_methods():
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({"method": "q", "weight_bits": 5, "bogus": 1})
    with pytest.raises(ValueError, match="method"):
        config_from_dict({"method": "float"})
    with pytest.raises(ValueError, match="method"):
        QConfig.from_dict(PSConfig().to_dict())
    with pytest.raises(ValueError, match="dict"):
        config_from_dict("q")  # type: ignore[arg-type]
